"""Plugin hook specifications (pluggy project name ``visguard``).

Every hook takes a ``register`` callback: plugins call it once per thing they provide, and the core
owns the registries. Built-in plugins (``visguard.default_plugins``) use these same hooks.
Documented in docs/plugins.md; a test fails when a hook or argument is missing there.
"""

from __future__ import annotations

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("visguard")
hookimpl = HookimplMarker("visguard")


@hookspec
def register_backends(register):
    """Register guard backends: ``register(name, factory)``; ``factory(model, **kwargs) -> Backend``."""


@hookspec
def register_formats(register):
    """Register guard formats: ``register(name, factory)``; ``factory(**kwargs) -> GuardFormat``."""


@hookspec
def register_model_formats(register):
    """Say which format a known guard checkpoint was trained for: ``register(model_id, factory)``;
    ``factory() -> GuardFormat`` (see :func:`visguard.plugins.format_for_model`)."""


@hookspec
def register_benchmarks(register):
    """Register benchmark loaders: ``register(name, factory)``; ``factory(**kwargs) -> Benchmark``."""


@hookspec
def register_judges(register):
    """Register response judges: ``register(name, factory)``; ``factory(**kwargs) -> Judge``."""


@hookspec
def register_trainers(register):
    """Register training adapters: ``register(name, factory)``; ``factory(**kwargs) -> Trainer``."""


@hookspec
def register_datasets(register):
    """Register training-data loaders: ``register(name, factory)``; ``factory(**kwargs) -> DatasetLoader``."""


@hookspec
def register_hosts(register):
    """Register host adapters for ``guard.wrap``: ``register(name, factory)``; ``factory(target, **kwargs) -> Host``."""


@hookspec
def register_commands(cli):
    """Add commands to the ``visguard`` CLI; ``cli`` is the root ``click.Group``."""
