"""LoRA adapters through peft, and the state-dict arithmetic around them.

Adapters are injected into our own decoder modules (peft wraps `q_proj` etc. in place: the base
weight becomes `q_proj.base_layer.weight`, the adapters `q_proj.lora_A.default.weight` and
`lora_B`), so every engine shards and checkpoints them like any other parameter, and a checkpoint
always holds base weights, adapters, projector and config together. The functions below turn such
a state dict into a merged LM or a peft adapter directory, without peft's model classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import lazy_tensors

ADAPTER = "default"  # peft's adapter name


@dataclass
class LoraConfig:
    """`task.lora` of tasks that fine-tune an LM with adapters."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"]
    )  # fmt: skip


def add_lora(model: nn.Module, lora: LoraConfig) -> None:
    """Inject LoRA into `model`'s target linear layers; only the adapters stay trainable."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config(lora), model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def peft_config(lora: LoraConfig, base_model: str | None = None):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def _split(key: str) -> tuple[str, str] | None:
    """'x.q_proj.lora_A.default.weight' -> ('x.q_proj', 'lora_A')."""
    for part in ("lora_A", "lora_B"):
        marker = f".{part}.{ADAPTER}.weight"
        if key.endswith(marker):
            return key[: -len(marker)], part
    return None


def has_lora(state: dict[str, torch.Tensor]) -> bool:
    return any(_split(k) for k in state)


def merge_lora_state(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Fold every adapter into its base weight: W + (alpha / r) B A, under the plain module names
    (`q_proj.weight`), as if the model never had adapters."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    merged = {}
    for key, value in state.items():
        split = _split(key)
        if split:
            adapters.setdefault(split[0], {})[split[1]] = value
        else:
            merged[key.replace(".base_layer.", ".")] = value
    for module, pair in adapters.items():
        weight, a, b = merged[f"{module}.weight"], pair["lora_A"], pair["lora_B"]
        scale = alpha / a.shape[0]
        # deferred to when it is written if these are an export's stand-ins
        merged[f"{module}.weight"] = lazy_tensors.derived(
            lambda w, a, b, s=scale: (w.float() + s * (b.float() @ a.float())).to(w.dtype),
            weight, a, b, like=weight,
        )  # fmt: skip
    return merged


def write_peft_adapter(
    state: dict[str, torch.Tensor], prefix: str, lora: LoraConfig, out: Path, base_model: str
) -> None:
    """A peft adapter directory (adapter_config.json + adapter_model.safetensors) for the
    submodule at `prefix` (e.g. "lm."), loadable with `PeftModel.from_pretrained` onto the
    exported base LM."""
    from .models.hub import write_safetensors

    tensors = {}
    for key, value in state.items():
        split = _split(key)
        if split and key.startswith(prefix):
            module = split[0][len(prefix) :]
            tensors[f"base_model.model.{module}.{split[1]}.weight"] = value
    if not tensors:
        raise ValueError(f"no LoRA adapters under {prefix!r} in this checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = peft_config(lora, base_model).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
