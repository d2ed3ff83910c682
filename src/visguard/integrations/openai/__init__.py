"""The OpenAI wire format (wire), the HTTP client of OpenAI-compatible servers (client) and visguard's own servers (server)."""
