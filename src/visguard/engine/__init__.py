"""The check engine: the Checker interface, formats and their check plans, backends, micro-batching, Guard and Cascade.

Depends on :mod:`visguard.core` and the plugin registry."""
