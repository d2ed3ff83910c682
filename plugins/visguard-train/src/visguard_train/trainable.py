"""What a guard format must offer to be trained: the training hooks, kept off the runtime format contract.

A :class:`~visguard.engine.format.GuardFormat` is what the guard needs at inference (``build``, ``parse``,
``plan``). Training needs more: the assistant text a perfect guard writes (``target``), a way to
phrase free-prose rationales in the format's grammar (``reasoning_text``), and the keyword arguments
a trained checkpoint records so it is later prompted with the layout it learned
(``checkpoint_kwargs``). Those are this plugin's :class:`TrainableFormat` protocol; the ``mirage``
objective also needs the follow-up verdict question (:class:`FollowupTrainableFormat`). A format
opts in by implementing the methods (``visguard`` and ``mirage`` do); ``visguard train`` checks the
format against the protocol before it loads any data or model (:func:`trainable_format`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, Protocol, runtime_checkable

from visguard.core.errors import InputError
from visguard.core.policy import Policy
from visguard.core.types import GuardRequest
from visguard.engine.format import GuardPrompt, PromptMode


@runtime_checkable
class TrainableFormat(Protocol):
    """A guard format ``visguard train`` can train (besides ``build``: the prompts it trains on)."""

    name: str

    def build(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt:
        """The guard prompt (the runtime format's own)."""
        ...

    def target(
        self,
        request: GuardRequest,
        policy: Policy,
        *,
        label: Literal["safe", "unsafe"],
        mode: PromptMode,
        category: str | None = None,
        sub_category: str | None = None,
        reasoning: str | None = None,
    ) -> str:
        """The assistant text a perfect guard produces for ``request`` (starting with the prompt's
        ``assistant_prefix``); may raise ``NotImplementedError`` for a mode it does not train."""
        ...

    def reasoning_text(self, rationale: str, perceptions: Iterable[str] = ()) -> str:
        """The reasoning part of a :meth:`target` in this format's grammar, from free prose
        (``rationale``: why the request is (un)safe; ``perceptions``: what each image shows)."""
        ...

    def checkpoint_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this format exactly (e.g. its prompt layout version):
        ``visguard train`` writes ``{"format": name, "format_kwargs": checkpoint_kwargs()}`` to
        the trained model's ``visguard.json``."""
        ...


@runtime_checkable
class FollowupTrainableFormat(TrainableFormat, Protocol):
    """A trainable format that asks a follow-up verdict question after the guard's answer (``mirage``)."""

    def followup(
        self, request: GuardRequest, policy: Policy, generated: str, *, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt | None:
        """The verdict question asked after the answer ``generated`` (``None``: none asked)."""
        ...

    def followup_target(self, label: Literal["safe", "unsafe"]) -> str:
        """The answer a perfect guard gives to the verdict question."""
        ...


_NEEDS: dict[str, type] = {"guard": TrainableFormat, "mirage": FollowupTrainableFormat}


def missing_hooks(fmt: Any, protocol: type = TrainableFormat) -> list[str]:
    """The methods of ``protocol`` that ``fmt`` lacks (empty: it implements them all)."""
    names = [n for n in ("target", "reasoning_text", "checkpoint_kwargs", "followup", "followup_target")
             if hasattr(protocol, n)]
    return [n for n in names if not callable(getattr(fmt, n, None))]


def trainable_format(fmt: Any, objective: str = "guard") -> Any:
    """``fmt`` itself when ``visguard train --objective objective`` can train it.

    ``guard`` needs a :class:`TrainableFormat`, ``mirage`` a :class:`FollowupTrainableFormat`;
    ``response`` trains answers, not the format, and needs neither.

    Raises:
        InputError: names the format, the objective and the methods it lacks.
    """
    protocol = _NEEDS.get(objective)
    if protocol is None:
        return fmt
    missing = missing_hooks(fmt, protocol)
    if missing:
        name = getattr(fmt, "name", "") or type(fmt).__name__
        raise InputError(
            f"guard format {name!r} cannot be trained (objective {objective!r}): it is not a "
            f"{protocol.__name__}, it lacks {', '.join(missing)} (see visguard_train.trainable)")
    return fmt
