"""Training methods (the ``trainers`` registry): what is trained and how the result is saved.

- ``full``: every weight (optionally not the vision tower); saves a plain checkpoint.
- ``lora``: PEFT LoRA adapters on the language model's projections (chosen per architecture);
  saves the adapter, and merges it into a plain checkpoint on request (:func:`merge_adapter`).

Both end with a directory that ``visguard.Guard.from_pretrained`` loads (LoRA after merging).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from visguard.core.errors import InputError
from visguard_train.config import TrainConfig

#: model_type -> regular expression (``re.fullmatch`` over module names) of the LoRA targets.
#: All name the language model's attention and MLP projections, never the vision tower
#: (whose CLIP/SigLIP layers reuse the names ``q_proj`` ... ).
_LM_PROJECTIONS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_TARGETS: dict[str, str] = {
    "qwen2_vl": rf".*language_model\.layers\.\d+\..*{_LM_PROJECTIONS}",
    "qwen2_5_vl": rf".*language_model\.layers\.\d+\..*{_LM_PROJECTIONS}",
    "llava": rf".*language_model\.layers\.\d+\..*{_LM_PROJECTIONS}",
    "llava_next": rf".*language_model\.layers\.\d+\..*{_LM_PROJECTIONS}",
    "internvl": rf".*language_model\.layers\.\d+\..*{_LM_PROJECTIONS}",
    "idefics3": rf".*text_model\.layers\.\d+\..*{_LM_PROJECTIONS}",
    "smolvlm": rf".*text_model\.layers\.\d+\..*{_LM_PROJECTIONS}",
}
_DEFAULT_LORA_TARGET = rf".*(language_model|text_model)\.layers\.\d+\..*{_LM_PROJECTIONS}"

_VISION_ATTRS = ("visual", "vision_tower", "vision_model")


class TrainingMethod:
    """Base class of training methods (register subclasses through ``register_trainers``).

    Args:
        config: the run's configuration.
    """

    #: registry name
    name: str = ""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def prepare(self, model: Any) -> Any:
        """Return the model to optimise (freeze, wrap ...)."""
        return model

    def save(self, trainer: Any, processor: Any, output: Path) -> None:
        """Write the final result to ``output`` (called on every process; writes on the main one)."""
        trainer.save_model(str(output))
        if trainer.is_world_process_zero():
            processor.save_pretrained(str(output))


class FullFineTuning(TrainingMethod):
    """Full-parameter fine-tuning (the paper's recipe); ``freeze_vision`` keeps the vision tower fixed."""

    name = "full"

    def prepare(self, model: Any) -> Any:
        if self.config.freeze_vision:
            tower = vision_tower(model)
            if tower is None:
                raise InputError(f"--freeze-vision: cannot find the vision tower of {type(model).__name__}")
            for p in tower.parameters():
                p.requires_grad_(False)
        return model


class LoraFineTuning(TrainingMethod):
    """LoRA adapters (PEFT) on the language model's attention and MLP projections."""

    name = "lora"

    def prepare(self, model: Any) -> Any:
        from peft import LoraConfig, get_peft_model

        target = self.config.lora_target or lora_target_for(model)
        if not any(_fullmatch(target, name) for name, _ in model.named_modules()):
            raise InputError(f"LoRA target {target!r} matches no module of {type(model).__name__}; set --lora-target")
        lora = LoraConfig(
            r=self.config.lora_r,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=target,
            bias="none",
        )
        if self.config.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        peft_model = get_peft_model(model, lora)
        return peft_model

    def save(self, trainer: Any, processor: Any, output: Path) -> None:
        adapter_dir = output / "adapter" if self.config.merge else output
        trainer.save_model(str(adapter_dir))
        if not trainer.is_world_process_zero():
            return
        processor.save_pretrained(str(adapter_dir))
        if self.config.merge:
            merge_adapter(adapter_dir, output, base=self.config.base)


def _fullmatch(pattern: str, name: str) -> bool:
    import re

    return re.fullmatch(pattern, name) is not None


def lora_target_for(model: Any) -> str:
    """The default LoRA target expression for a model's architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return LORA_TARGETS.get(model_type, _DEFAULT_LORA_TARGET)


def vision_tower(model: Any) -> Any | None:
    """The vision encoder module of a VLM (``visual``, ``vision_tower`` or ``vision_model``)."""
    for owner in (model, getattr(model, "model", None)):
        for attr in _VISION_ATTRS:
            tower = getattr(owner, attr, None) if owner is not None else None
            if tower is not None and hasattr(tower, "parameters"):
                return tower
    return None


def merge_adapter(adapter: str | Path, output: str | Path, *, base: str | None = None) -> Path:
    """Merge a saved LoRA adapter into its base model and save a plain checkpoint.

    Args:
        adapter: directory written by the ``lora`` trainer (``adapter_config.json`` ...).
        output: where the merged checkpoint (weights, processor, generation config) goes.
        base: the base model; default: the one recorded in the adapter's config.

    Returns:
        ``output`` as a path.

    Raises:
        InputError: ``adapter`` is not a LoRA adapter directory, or the base model is unknown.
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter, output = Path(adapter), Path(output)
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise InputError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json)")
    base = base or json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise InputError(f"{adapter}: the base model is not recorded; pass --base")
    model = AutoModelForImageTextToText.from_pretrained(base, dtype="auto", use_safetensors=True)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output), safe_serialization=True)
    processor_src = adapter if (adapter / "preprocessor_config.json").is_file() or (adapter / "processor_config.json").is_file() else base
    AutoProcessor.from_pretrained(str(processor_src)).save_pretrained(str(output))
    meta = adapter / "visguard_train.json"
    if meta.is_file() and adapter.resolve() != output.resolve():
        shutil.copy(meta, output / "visguard_train.json")
    return output
