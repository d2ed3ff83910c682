"""Guarding a host model: hosts, GuardedModel (pre-check, host call, post-check, streaming) and the audit log.

Depends on the engine."""
