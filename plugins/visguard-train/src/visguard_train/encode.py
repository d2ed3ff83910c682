"""From records to model inputs: training examples for each objective, and the multi-image collator.

An :class:`Example` is a prompt (chat messages, images, and the text the assistant turn starts with)
plus a continuation to learn. The prompt is rendered by exactly the code the guard runs at inference
(:class:`visguard.integrations.hf.HFPromptCodec`, which the transformers and vLLM backends use), so a guard trained
here sees at inference the same tokens it was trained on. Only continuation tokens carry labels; prompt, image and padding tokens are ``-100``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

from visguard.core.policy import Policy
from visguard.core.types import GuardRequest
from visguard.datasets import reasoning_of
from visguard.engine.format import GuardPrompt
from visguard_train.config import GuardMode, Objective
from visguard_train.data import DatasetError, Label, TrainRecord
from visguard_train.trainable import FollowupTrainableFormat, TrainableFormat

IGNORE_INDEX = -100
_SENTINEL = "\u2063VISGUARD-TRAIN-SENTINEL\u2063"


@dataclass(frozen=True)
class ExampleSpec:
    """Where one example comes from: a record, the objective and (guard) the prompt mode or
    (response) the assistant turn to learn."""

    record: TrainRecord
    objective: Objective | Literal["followup"]
    mode: GuardMode | None = None
    turn: int = 0
    #: the verdict this example is trained on when it is not the record's own label: a distilled
    #: fast verdict (the teacher's reason-mode verdict on the record, see :mod:`visguard_train.distill`)
    label: Label | None = None


@dataclass(frozen=True)
class Example:
    """One rendered training example.

    Attributes:
        prompt: the exact prompt text (chat template applied, assistant prefix appended).
        images: the images, in the order of the prompt's image placeholders.
        continuation: the text to learn, followed by the template's end-of-turn marker.
    """

    prompt: str
    images: list[Image.Image]
    continuation: str


def example_specs(
    records: Sequence[TrainRecord],
    objective: Objective,
    guard_modes: Sequence[GuardMode] = ("fast", "reason"),
    fast_labels: Sequence[Label | None] | None = None,
) -> list[ExampleSpec]:
    """Expand records into example specs.

    guard: one ``fast`` example per labelled record, plus one ``reason`` example for records with
    reasoning (when ``reason`` is in ``guard_modes``). response: one example per assistant turn.
    mirage: the response examples, plus for each labelled record with an answer one ``followup``
    example (the guard format's verdict question after that answer) and, when ``fast`` is in
    ``guard_modes``, one ``fast`` guard example.

    ``fast_labels`` (one per record, distillation): the fast examples are trained on these verdicts
    instead of the records' labels (``None``: that record gives no fast example, e.g. the teacher's
    verdict was unavailable); every other example keeps the record's own label.

    Raises:
        DatasetError: no record can be used for the objective (the message says what is missing).
    """
    if fast_labels is not None and len(fast_labels) != len(records):
        raise ValueError(f"fast_labels has {len(fast_labels)} entries for {len(records)} records")
    specs: list[ExampleSpec] = []
    for k, rec in enumerate(records):
        fast_label = rec.label if fast_labels is None else fast_labels[k]
        fast = ExampleSpec(rec, "guard", "fast", label=None if fast_labels is None else fast_label)
        if objective == "guard":
            if "fast" in guard_modes and fast_label is not None:
                specs.append(fast)
            if rec.label is not None and "reason" in guard_modes and (rec.reasoning or rec.rationale):
                specs.append(ExampleSpec(rec, "guard", "reason"))
        else:
            answers = [i for i, (role, _) in enumerate(rec.turns) if role == "assistant"]
            specs += [ExampleSpec(rec, "response", turn=i) for i in answers]
            if objective == "mirage" and answers:
                if rec.label is not None:
                    specs.append(ExampleSpec(rec, "followup", turn=answers[0]))
                if "fast" in guard_modes and fast_label is not None:
                    specs.append(fast)
    if not specs:
        need = "a label (safe/unsafe)" if objective == "guard" else "an assistant answer (conversations / answer)"
        raise DatasetError(f"no record has {need}: nothing to train for objective {objective!r}")
    return specs


class ExampleBuilder:
    """Turns :class:`ExampleSpec` into :class:`Example`, rendering like the inference backend.

    Args:
        codec: the :class:`~visguard.integrations.hf.HFPromptCodec` of the processor being trained (renders the
            chat template and knows the control tokens to neutralise in user text).
        guard_format: the guard format whose ``build`` / ``target`` define prompts and targets (a
            :class:`~visguard_train.trainable.TrainableFormat`).
        policy: the policy written into guard prompts (the guard's inference default: ``Policy()``).
    """

    def __init__(self, codec: Any, guard_format: TrainableFormat, policy: Policy | None = None) -> None:
        self.codec = codec
        self.format = guard_format
        self.policy = policy or Policy()
        self.end_of_turn = end_of_turn_marker(codec.processor)

    def build(self, spec: ExampleSpec) -> Example:
        """Render one example (loads its images through visguard's image boundary)."""
        rec = spec.record
        if spec.objective == "guard":
            request = GuardRequest.build(list(rec.images), rec.text, rec.response, limits=self.policy.limits)
            label = spec.label or rec.label
            assert spec.mode is not None and label is not None
            prompt = self.format.build(request, self.policy, mode=spec.mode, special_tokens=self.codec.special_tokens)
            target = self.format.target(
                request,
                self.policy,
                label=label,
                mode=spec.mode,
                category=rec.category,
                sub_category=rec.sub_category,
                reasoning=reasoning_of(self.format, rec),
            )
            if not target.startswith(prompt.assistant_prefix):
                raise DatasetError(
                    f"format {self.format.name!r}: target does not start with the prompt's assistant prefix "
                    f"{prompt.assistant_prefix!r}"
                )
            continuation = target[len(prompt.assistant_prefix) :]
        elif spec.objective == "followup":
            request = GuardRequest.build(list(rec.images), rec.text, limits=self.policy.limits)
            answer = rec.turns[spec.turn][1]
            fmt = self.format
            prompt = (fmt.followup(request, self.policy, answer, special_tokens=self.codec.special_tokens)
                      if isinstance(fmt, FollowupTrainableFormat) else None)
            if prompt is None or rec.label is None:
                raise DatasetError(f"format {fmt.name!r} asks no follow-up verdict question to train")
            continuation = fmt.followup_target(rec.label)  # type: ignore[attr-defined]
        else:
            request = GuardRequest.build(list(rec.images), "", limits=self.policy.limits)
            prompt = response_prompt(rec, spec.turn, [img.image for img in request.images])
            continuation = rec.turns[spec.turn][1]
        return Example(self.codec.render(prompt), list(prompt.images), continuation + self.end_of_turn)


def response_prompt(record: TrainRecord, turn: int, images: list[Image.Image]) -> GuardPrompt:
    """The chat prompt before assistant turn ``turn``: images first in the first user turn, then its
    text (the paper's Qwen2-VL layout ``[image, image, text]``), earlier turns as context."""
    messages: list[dict[str, Any]] = []
    for role, text in record.turns[:turn]:
        if role == "user" and not any(m["role"] == "user" for m in messages):
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        else:
            content = [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    if not messages or messages[0]["role"] != "user":
        raise DatasetError(f"record {record.id}: a conversation must start with a user turn")
    return GuardPrompt(messages=messages, images=images, assistant_prefix="", mode="reason")


def end_of_turn_marker(processor: Any) -> str:
    """The text the chat template puts after an assistant message (``<|im_end|>``, ``</s>`` ...).

    Found by rendering a sentinel assistant message; falls back to the tokenizer's eos token.
    """
    tok = getattr(processor, "tokenizer", processor)
    user = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    try:
        full = processor.apply_chat_template(
            [user, {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}], tokenize=False
        )
    except Exception:  # noqa: BLE001 - templates without assistant support: use eos
        full = ""
    if _SENTINEL in full:
        tail = full.split(_SENTINEL, 1)[1].rstrip()
        if tail:
            return tail
    if not tok.eos_token:
        raise DatasetError("cannot tell how an assistant turn ends: no chat-template marker and no eos token")
    return tok.eos_token


class ExampleDataset:
    """A map-style dataset of encoded examples (rendered lazily, images read when needed).

    Items are dicts ``{"prompt", "images", "continuation_ids"}`` for :class:`MultiImageCollator`.
    """

    def __init__(self, specs: Sequence[ExampleSpec], builder: ExampleBuilder, max_length: int | None = None) -> None:
        self.specs = list(specs)
        self.builder = builder
        self.tokenizer = builder.codec.tokenizer
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.builder.build(self.specs[i])
        ids = self.tokenizer(ex.continuation, add_special_tokens=False)["input_ids"]
        return {"prompt": ex.prompt, "images": ex.images, "continuation_ids": list(ids), "max_length": self.max_length}


class MultiImageCollator:
    """Batch examples with any number of images through the model's processor.

    The processor encodes the prompts and their images together (it knows how each architecture
    batches images: flat patch lists for Qwen2-VL, stacked tensors for LLaVA, padded per-prompt
    image lists for Idefics3). Each row's prompt tokens are then followed by its continuation
    tokens and the batch is left-padded, so every continuation ends at the last position. Labels are
    the continuation tokens; prompt, image and padding positions are ``-100``. Per-token processor
    outputs (``attention_mask``, ``mm_token_type_ids`` ...) are extended consistently.

    With ``logits_to_keep=True`` the batch also asks the model for logits of the last positions
    only (those that predict continuation tokens): the prompt, often hundreds of tokens with the
    images, then costs no vocabulary projection. :func:`continuation_loss` reads such logits.

    Args:
        processor: the model's processor.
        image_token_ids: ids never to be learned (image placeholders), as a safety net.
        logits_to_keep: add ``logits_to_keep`` to the batch (the model's forward must accept it).
    """

    def __init__(self, processor: Any, image_token_ids: Sequence[int] = (), *, logits_to_keep: bool = False) -> None:
        self.processor = processor
        self.logits_to_keep = logits_to_keep
        tok = getattr(processor, "tokenizer", processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.image_token_ids = [i for i in image_token_ids if i is not None]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        kwargs: dict[str, Any] = {"text": [f["prompt"] for f in features], "return_tensors": "pt", "padding": True}
        if any(f["images"] for f in features):
            kwargs["images"] = [list(f["images"]) for f in features]
        enc = self.processor(**kwargs)
        input_ids = enc["input_ids"]
        mask = enc["attention_mask"].bool()
        per_token = [k for k, v in enc.items() if k != "input_ids" and hasattr(v, "shape") and v.shape == input_ids.shape]
        rows: list[dict[str, Any]] = []
        for r, f in enumerate(features):
            keep = mask[r]
            prompt_ids = input_ids[r][keep]
            cont = torch.tensor(f["continuation_ids"], dtype=input_ids.dtype)
            limit = f.get("max_length")
            if limit is not None and len(prompt_ids) + len(cont) > limit:
                room = limit - len(prompt_ids)
                if room < 1:
                    raise DatasetError(
                        f"a prompt of {len(prompt_ids)} tokens exceeds max_length={limit}; raise --max-length"
                    )
                cont = cont[:room]
            ids = torch.cat([prompt_ids, cont])
            labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), cont])
            row = {"input_ids": ids, "labels": labels}
            for k in per_token:
                fill = 1 if k == "attention_mask" else 0
                row[k] = torch.cat([enc[k][r][keep], torch.full((len(cont),), fill, dtype=enc[k].dtype)])
            rows.append(row)
        width = max(len(row["input_ids"]) for row in rows)
        batch: dict[str, Any] = {}
        pads = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}
        for key in rows[0]:
            batch[key] = torch.stack(
                [torch.nn.functional.pad(row[key], (width - len(row[key]), 0), value=pads.get(key, 0)) for row in rows]
            )
        for tid in self.image_token_ids:
            batch["labels"][batch["input_ids"] == tid] = IGNORE_INDEX
        for k, v in enc.items():
            if k not in batch and k not in per_token:
                batch[k] = v
        if self.logits_to_keep:
            # The first label sits at -longest; its logits come from the position before it.
            longest = max(len(f["continuation_ids"]) for f in features)
            batch["logits_to_keep"] = min(longest + 1, width)
        return batch


def continuation_loss(
    outputs: Any, labels: Any, num_items_in_batch: Any = None, *, average: str = "token", examples_per_step: int | None = None
) -> Any:
    """Causal-LM cross-entropy over labelled (continuation) tokens, for ``Trainer(compute_loss_func=...)``.

    Works with full logits and with logits of the last positions only (``logits_to_keep``): labels
    are aligned to the logits from the right, as :class:`MultiImageCollator` left-pads.

    Args:
        outputs / labels / num_items_in_batch: what the ``Trainer`` passes.
        average: ``token``: the sum over target tokens divided by ``num_items_in_batch`` when the
            ``Trainer`` gives it (exact averaging over gradient accumulation and processes), else by
            this batch's token count: every target token weighs the same, so an example with a long
            target (a reason example) weighs as much as many short ones (fast verdicts).
            ``example``: each example's mean token loss, summed over the batch and divided by
            ``examples_per_step`` (the global batch; default: this batch's rows): every example
            weighs the same, whatever its target's length.
        examples_per_step: see ``average``.
    """
    import torch

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    tail = labels[:, -logits.shape[1] :]
    pred = logits[:, :-1, :].float()
    target = tail[:, 1:].to(pred.device)
    per_token = torch.nn.functional.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(target.shape)
    if average == "example":
        counts = target.ne(IGNORE_INDEX).sum(dim=1)
        rows = counts > 0
        per_example = per_token.sum(dim=1)[rows] / counts[rows]
        return per_example.sum() / (examples_per_step or max(int(rows.sum()), 1))
    if average != "token":
        raise ValueError(f"average must be 'token' or 'example', not {average!r}")
    total = per_token.sum()
    if num_items_in_batch is None:
        return total / target.ne(IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def image_token_ids(processor: Any) -> list[int]:
    """Token ids of the processor's image placeholders (``<|image_pad|>``, ``<image>`` ...)."""
    tok = getattr(processor, "tokenizer", processor)
    ids = []
    for attr in ("image_token", "video_token", "fake_image_token", "global_image_token", "boi_token", "eoi_token"):
        token = getattr(processor, attr, None)
        if isinstance(token, str):
            tid = tok.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tok.unk_token_id:
                ids.append(tid)
    return ids
