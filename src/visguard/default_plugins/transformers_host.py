"""The ``transformers`` host: a VLM in this process answers (images, text), whole or streamed."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from visguard.core.errors import BackendError
from visguard.core.images import GuardImage
from visguard.hookspecs import hookimpl
from visguard.hosting.hosts import Host, TokenUsage
from visguard.integrations.hf import load_image_text_model


class TransformersHost(Host):
    """Serve a Hugging Face image-text-to-text model as a host.

    Args:
        model: hub id or local path (or use :meth:`from_objects`).
        device / dtype / trust_remote_code: as for the transformers guard backend.
        max_new_tokens: default generation budget.
    """

    name = "transformers"
    generation_options = ("max_new_tokens",)  # decodes greedily: sampling settings are not taken

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                 max_new_tokens: int = 256) -> None:
        hf_model, processor = load_image_text_model(
            model, role="host", device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        self._setup(hf_model, processor, str(model), max_new_tokens)

    @classmethod
    def from_objects(cls, model: Any, processor: Any, *, model_id: str = "", max_new_tokens: int = 256) -> TransformersHost:
        """Wrap an already loaded model and processor."""
        self = cls.__new__(cls)
        self._setup(model, processor, model_id or getattr(model.config, "_name_or_path", ""), max_new_tokens)
        return self

    def _setup(self, model: Any, processor: Any, model_id: str, max_new_tokens: int) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.model_id = model_id
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()

    def _inputs(self, images: Sequence[GuardImage], text: str) -> Any:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt"}
        if images:
            kwargs["images"] = [[g.image for g in images]]
        inputs = self.processor(**kwargs)
        device, dtype = next(self.model.parameters()).device, self.model.dtype
        return {k: (v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}

    def _gen_kwargs(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "pad_token_id": self.tokenizer.pad_token_id
               if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id}
        out.update(gen_kwargs)
        return out

    def generate(self, images: Sequence[GuardImage], text: str, *, usage: TokenUsage | None = None,
                 **gen_kwargs: Any) -> str:
        """The answer; ``usage`` (if given) gets the prompt's and the answer's token counts."""
        import torch

        with self._lock, torch.inference_mode():
            inputs = self._inputs(images, text)
            seq = self.model.generate(**inputs, **self._gen_kwargs(gen_kwargs))
        prompt_len = inputs["input_ids"].shape[1]
        if usage is not None:
            usage.add(prompt_len, seq.shape[1] - prompt_len)
        return self.tokenizer.decode(seq[0, prompt_len:], skip_special_tokens=True)

    def stream(self, images: Sequence[GuardImage], text: str, *, cancel: threading.Event | None = None,
               usage: TokenUsage | None = None, **gen_kwargs: Any) -> Iterator[str]:
        """Yield text pieces as they are generated; setting ``cancel`` (or closing the iterator) stops generation.

        ``usage`` (if given) gets the token counts once generation has ended.
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop = cancel or threading.Event()

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        errors: list[BaseException] = []
        counts: list[int] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    inputs = self._inputs(images, text)
                    seq = self.model.generate(**inputs, **self._gen_kwargs(gen_kwargs), streamer=streamer,
                                              stopping_criteria=StoppingCriteriaList([_Cancel()]))
                    counts.extend((inputs["input_ids"].shape[1], seq.shape[1] - inputs["input_ids"].shape[1]))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="visguard-host-stream", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.set()
            worker.join()
            if usage is not None and counts:
                usage.add(*counts)
        if errors:
            raise BackendError(f"host generation failed: {errors[0]}") from errors[0]


@hookimpl
def register_hosts(register):
    register("transformers", TransformersHost)
