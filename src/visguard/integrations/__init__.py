"""Integrations with outside libraries and wire formats: Hugging Face (hf), OpenAI (wire, client, server), LangChain."""
