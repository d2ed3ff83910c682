"""Plugin manager: loads built-in and installed plugins, and serves the registries built from them.

Installed plugins are found through the ``visguard`` entry-point group. ``VISGUARD_LOAD_PLUGINS``
restricts which installed distributions load (comma-separated names; empty: none); the built-in
plugins always load. ``VISGUARD_TRACE_HOOKS=1`` prints every hook call to stderr.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pluggy

from visguard import hookspecs
from visguard.core.errors import InputError, PluginError

DEFAULT_PLUGINS = (
    "visguard.default_plugins.visguard_format",
    "visguard.default_plugins.llama_guard_format",
    "visguard.default_plugins.llavaguard_format",
    "visguard.default_plugins.shieldgemma_format",
    "visguard.default_plugins.guardreasoner_format",
    "visguard.default_plugins.qwen3guard_format",
    "visguard.default_plugins.mirage_format",
    "visguard.default_plugins.transformers_backend",
    "visguard.default_plugins.openai_backend",
    "visguard.default_plugins.serve_command",
    "visguard.default_plugins.transformers_host",
    "visguard.default_plugins.openai_host",
    "visguard.default_plugins.langchain_host",
    "visguard.default_plugins.benchmarks",
    "visguard.default_plugins.judges",
    "visguard.default_plugins.eval_command",
)

#: registry kinds, each served by the hook ``register_<kind>``
KINDS = ("backends", "formats", "model_formats", "benchmarks", "judges", "trainers", "datasets", "hosts")

pm = pluggy.PluginManager("visguard")
pm.add_hookspecs(hookspecs)

_lock = threading.RLock()
_loaded = False


def load_plugins() -> None:
    """Load built-in and installed plugins once (later calls do nothing)."""
    global _loaded
    with _lock:
        if _loaded:
            return
        for modname in DEFAULT_PLUGINS:
            mod = importlib.import_module(modname)
            if not pm.is_registered(mod):
                pm.register(mod, name=modname)
        allowed = os.environ.get("VISGUARD_LOAD_PLUGINS")
        if allowed is None:
            pm.load_setuptools_entrypoints("visguard")
        else:
            for dist_name in filter(None, (n.strip() for n in allowed.split(","))):
                _load_distribution(dist_name)
        if os.environ.get("VISGUARD_TRACE_HOOKS"):
            pm.add_hookcall_monitoring(_trace_before, _trace_after)
        _loaded = True


def _load_distribution(dist_name: str) -> None:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise PluginError(f"VISGUARD_LOAD_PLUGINS names {dist_name!r}, which is not installed") from exc
    for ep in dist.entry_points:
        if ep.group == "visguard" and pm.get_plugin(ep.name) is None:
            pm.register(ep.load(), name=ep.name)


def _trace_before(hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
    print(f"visguard hook: {hook_name} -> {[impl.plugin_name for impl in hook_impls]}", file=sys.stderr)


def _trace_after(
    outcome: pluggy.Result[Any], hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]
) -> None:
    pass


def registry(kind: str) -> dict[str, Callable[..., Any]]:
    """Collect ``name -> factory`` for one kind from every plugin.

    Raises:
        PluginError: ``kind`` is unknown, or two plugins register the same name.
    """
    if kind not in KINDS:
        raise PluginError(f"unknown registry {kind!r}; known: {KINDS}")
    load_plugins()
    found: dict[str, Callable[..., Any]] = {}
    owners: dict[str, str] = {}

    hook = getattr(pm.hook, f"register_{kind}")
    impls = hook.get_hookimpls()
    if os.environ.get("VISGUARD_TRACE_HOOKS"):  # registries call the implementations directly: trace them here
        _trace_before(f"register_{kind}", impls, {})
    for impl in impls:

        def register(name: str, factory: Callable[..., Any], _owner: str = impl.plugin_name) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_owner!r} registered a {kind[:-1]} without a name")
            if name in found:
                raise PluginError(f"{kind[:-1]} {name!r} registered by both {owners[name]!r} and {_owner!r}")
            found[name] = factory
            owners[name] = _owner

        impl.function(register=register)
    return found


def get(kind: str, name: str) -> Callable[..., Any]:
    """The factory registered as ``name`` in registry ``kind``.

    Raises:
        PluginError: no such name (the message lists the known ones).
    """
    reg = registry(kind)
    try:
        return reg[name]
    except KeyError:
        raise PluginError(
            f"no {kind[:-1]} named {name!r}; installed: {sorted(reg) or 'none'}"
            " (see `visguard plugins`)"
        ) from None


def option_names(factory: Callable[..., Any]) -> tuple[str, ...]:
    """The keyword options a backend / host / judge factory declares: its named parameters after the first.

    The first parameter is the target (model name, path or URL); ``**kwargs`` declares nothing.
    """
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return ()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params[1:] if p.kind in named)


def create(kind: str, name: str, target: Any, **options: Any) -> Any:
    """Call the factory registered as ``name`` with ``target`` and keyword ``options``.

    Raises:
        PluginError: no such name.
        InputError: an option the factory does not declare (unless it takes ``**kwargs``).
    """
    factory = get(kind, name)
    params: Iterable[inspect.Parameter]
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        params = ()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        unknown = sorted(set(options) - set(option_names(factory)))
        if unknown:
            raise InputError(f"the {name!r} {kind[:-1]} takes no option {', '.join(map(repr, unknown))}; "
                             f"its options: {', '.join(option_names(factory)) or 'none'}")
    return factory(target, **options)


def supported_options(kind: str, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that the factory registered as ``name`` declares (``None`` values dropped).

    This is how the command line passes its shorthands (``--device``, ``--base-url`` ...) without
    knowing any plugin: each goes only to factories that name it among their parameters.

    Raises:
        PluginError: no such name.
    """
    declared = option_names(get(kind, name))
    return {k: v for k, v in options.items() if v is not None and k in declared}


#: file in a checkpoint directory that names its guard format: ``{"format": NAME, "format_kwargs": {...}}``
MODEL_FORMAT_FILE = "visguard.json"


def format_for_model(model: str) -> Callable[[], Any] | None:
    """The format factory a guard checkpoint was trained for, or ``None`` when unknown.

    Looked up, in order: a ``visguard.json`` file in a local checkpoint directory; the model id in
    the ``model_formats`` registry (case-insensitive); for a local path, a Hugging Face cache
    folder ``models--ORG--NAME`` on the path, or the directory's own name matched against the
    name part of each registered id (a local copy of ``Tuwhy/Qwen2-VL-7B-MIRage`` kept as
    ``.../Qwen2-VL-7B-MIRage``). Nothing is downloaded.

    Raises:
        PluginError: ``visguard.json`` is unreadable or names an unknown format.
    """
    path = os.path.expanduser(str(model))
    marker = os.path.join(path, MODEL_FORMAT_FILE)
    if os.path.isfile(marker):
        try:
            with open(marker, encoding="utf-8") as fh:
                spec = json.load(fh)
            name, kwargs = spec["format"], dict(spec.get("format_kwargs") or {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PluginError(f"{marker} must hold {{\"format\": NAME, \"format_kwargs\": {{...}}}}: {exc}") from exc
        factory = get("formats", name)
        return lambda: factory(**kwargs)
    table = {k.lower(): f for k, f in registry("model_formats").items()}
    key = str(model).strip().rstrip("/").lower()
    if key in table:
        return table[key]
    if os.path.isdir(path):
        parts = [p for p in os.path.normpath(path).split(os.sep) if p]
        for part in reversed(parts):
            if part.lower().startswith("models--"):
                hub_id = part[len("models--"):].replace("--", "/", 1).lower()
                if hub_id in table:
                    return table[hub_id]
        base = parts[-1].lower() if parts else ""
        matches = [f for k, f in table.items() if k.rsplit("/", 1)[-1] == base]
        if len(matches) == 1:
            return matches[0]
    return None


#: the format a guard runs with when neither the caller nor the checkpoint names one
DEFAULT_FORMAT = "visguard"


def resolve_format(model: str | None, format: Any = None) -> Any:
    """The one model-to-format resolver: the guard format to run ``model`` with (a new instance).

    An explicit ``format`` instance is returned as is; otherwise the format registered for the
    model (:func:`format_for_model`: a checkpoint's ``visguard.json``, the ``register_model_formats``
    table, e.g. ``Tuwhy/Qwen2-VL-7B-MIRage`` -> ``mirage``); otherwise :data:`DEFAULT_FORMAT`
    (also the format of datasets' reasoning targets, ``model=None``). Naming the checkpoint's own
    format (``format="mirage"`` for a MIRage id) keeps the table's settings for it.

    Raises:
        PluginError: an unknown format name, or a bad ``visguard.json``.
        TypeError: ``format`` is neither a name nor ``None`` nor a format instance.
    """
    if format is not None and not isinstance(format, str):
        if not callable(getattr(format, "plan", None)):
            raise TypeError(f"format must be a name or a GuardFormat, got {type(format).__name__}")
        return format
    factory = format_for_model(str(model)) if model is not None else None
    native = factory() if factory is not None else None
    if format is None:
        return native if native is not None else get("formats", DEFAULT_FORMAT)()
    return native if native is not None and native.name == format else get("formats", format)()


def describe() -> list[dict[str, Any]]:
    """One entry per loaded plugin: its name, the hooks it implements, and what it registers."""
    load_plugins()
    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        hooks = sorted(impl.name for impl in pm.get_hookcallers(plugin) or [])
        provides: dict[str, list[str]] = {}
        for kind in KINDS:
            hook = getattr(pm.hook, f"register_{kind}")
            for impl in hook.get_hookimpls():
                if impl.plugin is plugin:
                    names: list[str] = []
                    impl.function(register=lambda n, f, _names=names: _names.append(n))
                    provides[kind] = sorted(names)
        dist = _distribution_of(name)
        out.append({"name": name, "hooks": hooks, "provides": provides, "distribution": dist})
    return sorted(out, key=lambda p: p["name"])


def _distribution_of(plugin_name: str) -> str | None:
    if plugin_name.startswith("visguard.default_plugins."):
        return "visguard"
    for plugin, dist in pm.list_plugin_distinfo():
        if pm.get_name(plugin) == plugin_name:
            return dist.project_name
    return None
