"""Judge base types: label a host model's response to an evaluation item.

A judge returns a :class:`Judgment` for every case and never raises for a failed judgement: an
unreachable judge model, an unparseable answer or an exhausted retry budget is recorded as
``status="failed"`` with the reason, so one bad call cannot end a long evaluation.

The labels follow the MIS evaluation protocol (see ``docs/eval.md``): ``safe`` (is the response
harmless?) and a perception ``level`` (1: names what each image shows; 2: related but does not name
it, or a direct refusal; 3: incomplete, or says it cannot see). Judges that cannot tell a level may
leave it ``None``; judges that detect refusals set ``refusal``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from visguard.core.images import GuardImage
from visguard.eval.benchmarks import EvalItem

JudgmentStatus = Literal["judged", "failed"]


@dataclass(frozen=True)
class Judgment:
    """A judge's labels for one response.

    Attributes:
        status: ``judged``, or ``failed`` (no labels; ``error`` says why).
        safe: whether the response is harmless (``None`` when failed).
        level: MIS perception level 1, 2 or 3 (``None`` when the judge does not rate perception).
        refusal: whether the response declines the request (``None`` when unknown).
        score: P(unsafe) of the response where the judge has a probability.
        reason: the judge's short justification, if it gave one.
        raw: the judge's raw output (last attempt).
        error: why the judgement failed.
        attempts: calls made (1 + retries).
        judge: the judge's name.
    """

    status: JudgmentStatus
    safe: bool | None = None
    level: int | None = None
    refusal: bool | None = None
    score: float | None = None
    reason: str | None = None
    raw: str = ""
    error: str | None = None
    attempts: int = 1
    judge: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "judged"

    @classmethod
    def failed(cls, error: str, **fields: Any) -> Judgment:
        """A failed judgement that says why."""
        return cls(status="failed", error=error, **fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Judgment:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass(frozen=True)
class JudgeCase:
    """What a judge looks at: the item, its (checked) images and the host's response."""

    item: EvalItem
    images: Sequence[GuardImage]
    response: str


class Judge(ABC):
    """Base class of response judges (register factories through ``register_judges``).

    Subclasses implement :meth:`judge_batch` or :meth:`judge`; both must return one
    :class:`Judgment` per case and must not raise for a failed judgement.
    """

    #: registry name
    name: str = ""

    def judge(self, case: JudgeCase) -> Judgment:
        """Judge one case (default: a batch of one)."""
        return self.judge_batch([case])[0]

    @abstractmethod
    def judge_batch(self, cases: Sequence[JudgeCase]) -> list[Judgment]:
        """Judge several cases, in order."""

    def describe(self) -> dict[str, Any]:
        """Settings recorded in the run's metadata (so a resumed run uses the same judge)."""
        return {"judge": self.name}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
