"""Our model implementations and the Hugging Face checkpoint API.

    model = core.models.from_pretrained("path/to/hf_checkpoint")   # any supported family
    core.models.save_pretrained(model, "out/")                      # transformers loads it back

Every model class implements the same small protocol:
    MODEL_TYPES: tuple[str, ...]                 config.json `model_type`s it loads
    from_hf_config(cls, cfg: dict) -> model      build from a config.json dict (either the
                                                 current or the older transformers format)
    hf_state_dict_from(state, cfg) -> state      map a checkpoint's tensors to our keys
                                                 (strip wrapper prefixes, e.g. a full SigLIP
                                                 or PaliGemma checkpoint's sub-model)
    load_hf_state_dict(self, state)              load those tensors into a model built on the
                                                 meta device (assign=True), rebuild non-persistent
                                                 buffers (RoPE tables), tie weights; missing or
                                                 unexpected keys are an error naming them
    hf_config(self) -> dict                      config.json that transformers loads
    hf_state_dict(self) -> state                 tensors under transformers' names

Each family module registers its classes (`@register`, core/models/registry.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import cappa, decoder, hub, paligemma, text, vision  # noqa: F401 - each registers its families
from .registry import FAMILIES, TEXT_TOWERS, register  # noqa: F401 - register: the decorator

PARTS = ("", "text")


def model_class(model_type: str, part: str = "") -> type:
    """Our class for `model_type`; part="text": for a two-tower type (`siglip`), its text
    tower's (FAMILIES gives its vision tower's)."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; valid: '' (the model), 'text'")
    if part == "text" and model_type in TEXT_TOWERS:
        return TEXT_TOWERS[model_type]
    families = FAMILIES
    if model_type not in families:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(families))}"
        )
    if part == "text" and issubclass(families[model_type], vision.VisionTower):
        raise ValueError(
            f"model_type {model_type!r} has no text tower here; two-tower checkpoints whose "
            f"text tower loads: {', '.join(sorted(TEXT_TOWERS))}"
        )
    return families[model_type]


def from_config(cfg: dict) -> torch.nn.Module:
    """A randomly initialised model of the family named by cfg['model_type']."""
    return model_class(cfg["model_type"]).from_hf_config(cfg)


def from_pretrained(
    path: str | Path, dtype: torch.dtype | None = None, part: str = ""
) -> torch.nn.Module:
    """Load a local Hugging Face checkpoint directory into our implementation of its family.
    A two-tower checkpoint (a full SiglipModel) gives its vision tower, or with part="text" its
    text tower; part="text" on any other checkpoint gives the model itself. A decoder LM loads
    from its task-head (`Qwen3ForCausalLM`) or base-model (`Qwen3Model`) layout; a base one gets
    its embeddings as vocabulary head and saves back as a base model (core/models/decoder.py).
    Called on the meta device (`with torch.device("meta")`), it reads config.json and the
    safetensors headers only, never the weights."""
    cfg = hub.read_config(path)
    cls = model_class(cfg["model_type"], part)
    with torch.device("meta"):
        model = cls.from_hf_config(cfg)
    if hub.building_on_meta():  # the caller's device, outside the block above
        # Shapes only: the weights are not read. Their names and shapes (the safetensors headers)
        # still decide what the config does not record (e.g. a ViT's optional pooler); with no
        # weight files here, the config's shapes stand.
        state = hub.meta_state_dict(path)
    else:
        state = hub.load_state_dict(path)
    if state is not None:
        model.load_hf_state_dict(cls.hf_state_dict_from(state, cfg))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_pretrained(model: torch.nn.Module, path: str | Path, max_shard_bytes: int | None = None):
    hub.write_config(model.hf_config(), path)
    hub.save_state_dict(model.hf_state_dict(), path, max_shard_bytes=max_shard_bytes)
