"""Guards as configuration: one TOML file describes guards, cascades, the policy and serving.

The file is validated by pydantic models that are the ones the Python API uses
(:class:`~visguard.core.policy.Policy`, :class:`~visguard.core.policy.Category`,
:class:`~visguard.core.images.ImageLimits`) plus :class:`GuardSpec`, :class:`CascadeSpec` and
:class:`ServeSpec`; :func:`load_config` reads it, :meth:`VisguardConfig.build` turns it into the
:class:`~visguard.engine.checker.Checker` a Python user would build (``Guard.from_pretrained`` /
``Cascade``). ``visguard config schema`` prints the JSON Schema (docs/configuration.md lists every
key). Example::

    [policy]
    threshold = 0.5
    [[policy.categories]]
    name = "Violent"
    threshold = 0.3

    [guards.mirage]
    model = "Tuwhy/Qwen2-VL-7B-MIRage"

Secrets never sit in the file: a key ending in ``_env`` names an environment variable
(``api_key_env = "OPENAI_API_KEY"``); a key that looks like a secret itself (``api_key``,
``token``, ``password`` ...) is refused, and a named variable that is unset is an error at load
time, before any model is loaded. Every error names the file, the key path, the line where it
can be found, and what is expected (:class:`ConfigError`).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from visguard import plugins
from visguard.core.errors import InputError, PluginError
from visguard.core.policy import Mode, Policy
from visguard.hosting.guarded import OnUnsafe, PreCheck

if TYPE_CHECKING:  # pragma: no cover
    from visguard.engine.checker import Checker

Escalate = Literal["unsure", "flagged", "unsure_or_flagged"]
CheckKind = Literal["input", "output"]
_BOTH_CHECKS: tuple[CheckKind, ...] = ("input", "output")
#: option names that would hold a secret: put the secret in an environment variable, name it ``*_env``
_SECRET_KEY = re.compile(r"(^|_)(api_?key|key|token|secret|password|passwd|auth)$", re.I)


class ConfigError(InputError):
    """A configuration file that cannot be used; ``issues`` holds every ``(key path, line, what is expected)``."""

    def __init__(self, file: str, issues: Sequence[tuple[str, int | None, str]]) -> None:
        self.file = file
        self.issues = list(issues)
        super().__init__("; ".join(self.lines()))

    def lines(self) -> list[str]:
        """One line per issue: ``FILE:LINE: key.path: what is expected``."""
        return [f"{self.file}{f':{line}' if line else ''}: {path or '(top level)'}: {msg}"
                for path, line, msg in self.issues]


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GuardSpec(_Spec):
    """One named guard: ``Guard.from_pretrained(model, backend=..., format=..., **options)``.

    Args:
        model: hub id or local path of the guard checkpoint (the ``openai`` backend: the served name).
        backend: backend plugin name.
        format: format plugin name (default: the checkpoint's own, see :func:`visguard.plugins.resolve_format`).
        device: where a local backend runs (``cpu``, ``cuda:1`` ...), for backends that take ``device``.
        options: the backend's keyword arguments (``dtype``, ``base_url``, ``api_key_env`` ...); no secrets.
        mode: this guard's mode (default: the policy's where the format runs it, else the format's own).
        ignore_unread: a single-modality guard judges the part it reads instead of refusing requests with more.
    """

    model: str = Field(min_length=1)
    backend: str = "transformers"
    format: str | None = None
    device: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    mode: Mode | None = None
    ignore_unread: bool = False


class StageSpec(_Spec):
    """One stage of a cascade (:class:`~visguard.engine.cascade.Stage`).

    Args:
        guards: names of guards defined under ``[guards]``, judged together.
        escalate: which verdicts go on to the next stage (the last stage always decides).
        band: closed interval of P(unsafe) that counts as unsure.
        checks: which checks the stage takes part in.
        name: shown in stats (default: the guards' model ids).
    """

    guards: list[str] = Field(min_length=1)
    escalate: Escalate = "unsure"
    band: tuple[float, float] = (0.2, 0.8)
    checks: list[CheckKind] = Field(default_factory=lambda: list(_BOTH_CHECKS), min_length=1)
    name: str = ""


class CascadeSpec(_Spec):
    """A named cascade (:class:`~visguard.engine.cascade.Cascade`): its stages, cheapest first."""

    stages: list[StageSpec] = Field(min_length=1)


class _CallSpec(_Spec):
    post_check: bool = True
    stream_check_every: int = Field(default=16, ge=1)
    stream_check_min_pieces: int = Field(default=8, ge=1)
    refusal: str | None = None

    def _call_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"post_check": self.post_check, "stream_check_every": self.stream_check_every,
                               "stream_check_min_pieces": self.stream_check_min_pieces}
        if self.refusal is not None:
            out["refusal"] = self.refusal
        return out


class GuardedSpec(_CallSpec):
    """How ``guard.wrap`` acts: the file's part of :class:`~visguard.hosting.guarded.GuardedOptions`
    (which validates what :meth:`options` returns).

    Args:
        on_unsafe: ``refuse``, ``safe_answer``, ``raise`` or ``return``.
        pre_check: ``sequential``, ``parallel`` or ``off``.
        post_check: check the host's answers.
        stream_check_every: re-check a stream every N pieces (and at sentence ends).
        stream_check_min_pieces: a sentence end re-checks a stream only after this many new pieces.
        refusal: the refusal template (fields ``{category}``, ``{sub_category}``, ``{label}``, ``{stage}``, ``{score}``).
    """

    on_unsafe: OnUnsafe = "refuse"
    pre_check: PreCheck = "sequential"

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``guard.wrap``, checked by :class:`~visguard.hosting.guarded.GuardedOptions`
        (``guard.wrap(host, **config.guarded.options())``)."""
        from visguard.hosting.guarded import GuardedOptions

        out = {"on_unsafe": self.on_unsafe, "pre_check": self.pre_check, **self._call_options()}
        GuardedOptions(**out)  # the one options model of guarded calls validates them
        return out


class ServeSpec(_CallSpec):
    """``visguard serve``: where it listens, the host it guards, auth, audit and limits.

    Args:
        on_unsafe: ``refuse``, ``safe_answer`` or ``error`` (HTTP 400 ``content_filter``).
        pre_check: ``sequential`` or ``parallel``.
        post_check / stream_check_every / stream_check_min_pieces / refusal: as for ``guard.wrap``
            (:class:`GuardedSpec`).
        host / port: the interface and port to listen on.
        upstream: OpenAI-compatible base URL of the host model to guard (``.../v1``).
        upstream_model: the upstream's model name.
        api_key_env: environment variable holding the upstream's API key.
        host_model: a local host model (path or hub id) to serve guarded, in process.
        host_options: the host's keyword arguments (no secrets).
        served_model_name: the model name chat clients use.
        auth_token_env: environment variable with the bearer token clients must send; several tokens
            (one per tenant) comma-separated, each with its own cache salt (docs/serving.md).
        audit: path of the JSONL audit log.
        max_concurrency / max_body_mb: requests served at once (more: 429) / largest body (larger: 413).
        max_batch_size / max_wait_ms: micro-batching of checks.
        ready_timeout_s: how long ``/readyz`` waits for the upstream.
    """

    on_unsafe: Literal["refuse", "safe_answer", "error"] = "refuse"
    pre_check: Literal["sequential", "parallel"] = "sequential"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    upstream: str | None = None
    upstream_model: str | None = None
    api_key_env: str | None = None
    host_model: str | None = None
    host_options: dict[str, Any] = Field(default_factory=dict)
    served_model_name: str | None = None
    auth_token_env: str | None = None
    audit: str | None = None
    max_concurrency: int = Field(default=64, ge=1)
    max_body_mb: float = Field(default=32.0, ge=0.001)
    max_batch_size: int = Field(default=8, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)
    ready_timeout_s: float = Field(default=2.0, gt=0)

    def settings(self, **extra: Any) -> Any:
        """The server's :class:`~visguard.integrations.openai.server.app.ServeSettings` (needs the serve extra)."""
        from visguard.integrations.openai.server.app import ServeSettings

        value = os.environ.get(self.auth_token_env, "") if self.auth_token_env else ""
        tokens = tuple(t.strip() for t in value.split(",") if t.strip())
        return ServeSettings(
            model_name=self.served_model_name or self.upstream_model
            or (os.path.basename(self.host_model.rstrip("/")) if self.host_model else None),
            max_concurrency=self.max_concurrency, max_body_bytes=int(self.max_body_mb * 1024 * 1024),
            auth_tokens=tokens, max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms,
            on_unsafe=self.on_unsafe, pre_check=self.pre_check, post_check=self.post_check,
            stream_check_every=self.stream_check_every, stream_check_min_pieces=self.stream_check_min_pieces,
            refusal=self.refusal, ready_timeout_s=self.ready_timeout_s, audit=self.audit, **extra)


class VisguardConfig(_Spec):
    """A whole configuration file.

    Args:
        use: the guard or cascade the commands run (default: the only cascade, else the only guard).
        policy: the :class:`~visguard.core.policy.Policy` (categories with per-category threshold and
            action, threshold, mode, on_error, timeout_s, limits ...).
        guards: named guards.
        cascades: named cascades of those guards.
        guarded: how ``guard.wrap`` acts (:class:`GuardedSpec`).
        serve: ``visguard serve``'s settings (:class:`ServeSpec`).
    """

    use: str | None = None
    policy: Policy = Field(default_factory=Policy)
    guards: dict[str, GuardSpec] = Field(default_factory=dict)
    cascades: dict[str, CascadeSpec] = Field(default_factory=dict)
    guarded: GuardedSpec = Field(default_factory=GuardedSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)

    @field_validator("guards", "cascades")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [n for n in value if not re.fullmatch(r"[A-Za-z0-9_.-]+", n)]
        if bad:
            raise ValueError(f"names are letters, digits, '_', '-', '.': {bad}")
        return value

    # ------------------------------------------------------------------ what the file leads to
    def target(self, name: str | None = None) -> str:
        """The guard or cascade to build: ``name``, else ``use``, else the only cascade, else the only guard.

        Raises:
            InputError: the name is unknown, or the file defines several and names none.
        """
        name = name or self.use
        if name:
            if name not in self.guards and name not in self.cascades:
                raise InputError(f"no guard or cascade named {name!r}; defined: {sorted({*self.guards, *self.cascades})}")
            return name
        if len(self.cascades) == 1:
            return next(iter(self.cascades))
        if not self.cascades and len(self.guards) == 1:
            return next(iter(self.guards))
        raise InputError("the configuration defines "
                         + (f"{len(self.cascades)} cascades" if self.cascades else f"{len(self.guards)} guards")
                         + ": name one with use = \"NAME\"")

    def build(self, name: str | None = None, *, policy: Policy | None = None) -> Checker:
        """The Checker the file describes (a :class:`~visguard.engine.guard.Guard` or a
        :class:`~visguard.engine.cascade.Cascade`), built as a Python user would.

        Args:
            name: which guard or cascade (default: :meth:`target`).
            policy: overrides the file's policy (the CLI's flags).
        """
        from visguard.engine.cascade import Cascade, Stage

        target, policy = self.target(name), policy or self.policy
        if target in self.guards:
            return self.build_guard(target, policy=policy)
        loaded: dict[str, Checker] = {}
        try:
            stages = []
            for stage in self.cascades[target].stages:
                for g in stage.guards:
                    if g not in loaded:
                        loaded[g] = self.build_guard(g, policy=policy)
                stages.append(Stage(tuple(loaded[g] for g in stage.guards), escalate=stage.escalate,
                                    band=stage.band, name=stage.name, checks=tuple(stage.checks)))
            return Cascade(stages, policy=policy)
        except BaseException:
            for guard in loaded.values():
                guard.close()
            raise

    def build_guard(self, name: str, *, policy: Policy | None = None) -> Checker:
        """The guard ``[guards.NAME]``: ``Guard.from_pretrained`` with its backend options and format.

        Its policy is ``policy`` (default: the file's) in the guard's ``mode``, else the policy's mode
        where its format runs it, else the format's own.
        """
        from visguard.engine.guard import Guard

        spec, policy = self.guards[name], policy or self.policy
        guard_format = plugins.resolve_format(spec.model, spec.format)
        if spec.ignore_unread:
            guard_format.ignore_unread = True
        kwargs = {**plugins.supported_options("backends", spec.backend, {"device": spec.device}), **spec.options}
        guard = Guard.from_pretrained(spec.model, backend=spec.backend, format=guard_format,
                                      policy=policy.updated(mode=None), **kwargs)
        mode = spec.mode or policy.mode
        if mode is not None and mode in guard.capabilities.modes:
            guard = guard.with_policy(mode=mode)
        return guard

    def secrets(self) -> dict[str, str]:
        """``{key path: environment variable}`` for every ``*_env`` key of the file."""
        out: dict[str, str] = {}

        def walk(value: Any, path: str) -> None:
            if isinstance(value, Mapping):
                for k, v in value.items():
                    sub = f"{path}.{k}" if path else str(k)
                    if str(k).endswith("_env") and isinstance(v, str):
                        out[sub] = v
                    else:
                        walk(v, sub)

        walk(self.model_dump(mode="json"), "")
        return out

    def resolved(self) -> dict[str, Any]:
        """The configuration with every default filled in, JSON-ready; secrets masked (``visguard config show``)."""
        data = self.model_dump(mode="json")
        data["secrets"] = {var: ("***" if os.environ.get(var) else "(unset)") for var in self.secrets().values()}
        return data


# ---------------------------------------------------------------------------------- loading


def config_schema() -> dict[str, Any]:
    """The JSON Schema of a configuration file (``visguard config schema``)."""
    schema = VisguardConfig.model_json_schema()
    schema["title"] = "visguard configuration"
    schema["$id"] = "https://github.com/visguard/visguard/docs/configuration.schema.json"
    return schema


def load_config(path: str | os.PathLike[str], *, check_env: bool = True) -> VisguardConfig:
    """Read and check a configuration file; no model is loaded.

    Checks, each reported with the file, key path, line and what is expected: TOML syntax, unknown
    keys, wrong types, out-of-range values, a category named twice, a stage naming an undefined
    guard, an unknown backend or format plugin, a secret written into the file, and (``check_env``)
    an environment variable named by a ``*_env`` key that is unset.

    Raises:
        ConfigError: the file cannot be used (every issue at once).
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, [("", None, f"cannot read the file ({exc.__class__.__name__}: {exc})")]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(file, [("", int(m.group(1)) if m else None, f"not valid TOML: {exc}")]) from exc
    issues: list[tuple[str, int | None, str]] = []
    try:
        # strict JSON validation: TOML's own types count ("0.5" is no number), arrays fill tuples
        config = VisguardConfig.model_validate_json(json.dumps(data, default=str), strict=True)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            issues.append((_dotted(loc), _line_of(text, loc), _expected(err)))
        issues.extend(_raw_issues(text, data, check_env=check_env))  # every error at once
        raise ConfigError(file, issues) from exc
    issues.extend(_raw_issues(text, data, check_env=check_env))
    issues.extend(_semantic_issues(config, text))
    if issues:
        raise ConfigError(file, issues)
    return config


def _raw_issues(text: str, data: Mapping[str, Any], *, check_env: bool) -> list[tuple[str, int | None, str]]:
    """Checks that need only the parsed TOML (so they are reported with the schema's errors too):
    stages naming undefined guards, secrets written into the file, unset environment variables."""
    issues: list[tuple[str, int | None, str]] = []

    def add(loc: tuple[Any, ...], msg: str) -> None:
        issues.append((_dotted(loc), _line_of(text, loc), msg))

    raw_guards, raw_cascades = data.get("guards"), data.get("cascades")
    guards: Mapping[str, Any] = raw_guards if isinstance(raw_guards, Mapping) else {}
    cascades: Mapping[str, Any] = raw_cascades if isinstance(raw_cascades, Mapping) else {}
    for cname, cascade in cascades.items():
        stages = cascade.get("stages") if isinstance(cascade, Mapping) else None
        for i, stage in enumerate(stages if isinstance(stages, list) else []):
            names = stage.get("guards") if isinstance(stage, Mapping) else None
            for guard in names if isinstance(names, list) else []:
                if isinstance(guard, str) and guard not in guards:
                    add(("cascades", cname, "stages", i, "guards"),
                        f"names guard {guard!r}, which is not defined; expected one of {sorted(guards)}")
    for path, key, value in _walk(data):
        if _SECRET_KEY.search(key) and not key.endswith("_env") and value not in (None, ""):
            add(path, "secrets never go in the file: name an environment variable instead "
                      f"({key}_env = \"NAME\")")
    if check_env:
        for path, key, value in _walk(data):
            if key.endswith("_env") and isinstance(value, str) and not os.environ.get(value):
                add(path, f"expected the environment variable {value} to be set (it is unset or empty)")
    return issues


def _semantic_issues(config: VisguardConfig, text: str) -> list[tuple[str, int | None, str]]:
    """Checks on the validated models: stage bands, names, ``use``, plugin names."""
    issues: list[tuple[str, int | None, str]] = []

    def add(loc: tuple[Any, ...], msg: str) -> None:
        issues.append((_dotted(loc), _line_of(text, loc), msg))

    for cname, cascade in config.cascades.items():
        for i, stage in enumerate(cascade.stages):
            low, high = stage.band
            if not 0.0 <= low <= high <= 1.0:
                add(("cascades", cname, "stages", i, "band"), f"expected 0 <= low <= high <= 1, got {list(stage.band)}")
    both = sorted(set(config.guards) & set(config.cascades))
    for name in both:
        add(("cascades", name), "a guard has the same name; expected distinct names")
    if config.use is not None and config.use not in config.guards and config.use not in config.cascades:
        add(("use",), f"expected the name of a guard or cascade {sorted({*config.guards, *config.cascades})}, "
                      f"got {config.use!r}")
    for gname, spec in config.guards.items():
        for kind, value in (("backends", spec.backend), ("formats", spec.format)):
            if value is None:
                continue
            try:
                plugins.get(kind, value)
            except PluginError:
                key = "backend" if kind == "backends" else "format"
                add(("guards", gname, key), f"expected a registered {key} plugin {sorted(plugins.registry(kind))}, "
                                            f"got {value!r}")
    return issues


def _walk(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], str, Any]]:
    out: list[tuple[tuple[Any, ...], str, Any]] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.append(((*path, k), str(k), v))
            out.extend(_walk(v, (*path, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_walk(v, (*path, i)))
    return out


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _expected(err: Mapping[str, Any]) -> str:
    kind, msg = err.get("type", ""), str(err.get("msg", ""))
    if kind == "extra_forbidden":
        return "unknown key (not in the schema: visguard config schema)"
    given = err.get("input")
    shown = json.dumps(given, default=str)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{msg[0].lower() + msg[1:] if msg else kind}, got {shown}"


def _line_of(text: str, loc: Sequence[Any]) -> int | None:
    """The line of ``loc`` in the TOML ``text``, where a simple scan finds it: ``[tables]``,
    ``[[arrays of tables]]`` (counted, so ``policy.categories[1]`` is the second), ``key = value`` lines."""
    target = [p if isinstance(p, int) else str(p) for p in loc]
    if not target:
        return None
    header = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    assign = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+)\s*=")
    counts: dict[tuple[str, ...], int] = {}
    table: list[Any] = []
    fallback: tuple[int, int] | None = None  # (depth, line) of the deepest table on the way
    for number, line in enumerate(text.splitlines(), 1):
        m = header.match(line)
        if m:
            path = [k.strip().strip("\"'") for k in m.group(2).split(".")]
            if m.group(1) == "[[":
                counts[tuple(path)] = counts.get(tuple(path), -1) + 1
                table = [*path, counts[tuple(path)]]
                if target == path and fallback is None:  # the array itself: its first table
                    fallback = (len(path), number)
            else:
                table = path
            if target[: len(table)] == table and (fallback is None or len(table) > fallback[0]):
                fallback = (len(table), number)
            continue
        a = assign.match(line)
        if a:
            key = [*table, *(k.strip("\"'") for k in a.group(1).split("."))]
            if target[: len(key)] == key:
                return number
    return fallback[1] if fallback else None
