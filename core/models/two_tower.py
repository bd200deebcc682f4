"""Whole two-tower checkpoints (a full SigLIP, transformers' SiglipModel): both towers in one
directory, `vision_model.*` and `text_model.*`, with the contrastive loss's `logit_scale` (the log
temperature) and `logit_bias`. core.models loads each tower from it (`from_pretrained(path)`,
`from_pretrained(path, part="text")`); this module reads the two scalars and writes the whole
model back.

    logits_per_text = exp(logit_scale) * normalize(text.pool(...)) @ normalize(vision.pool(...)).T
                      + logit_bias
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import hub

WHOLE_TYPES = {"siglip": "SiglipModel"}  # model_type -> the transformers class of the whole


def is_whole(path: str | Path) -> bool:
    """Whether a checkpoint directory holds a whole two-tower model vlscale loads."""
    return hub.read_config(path)["model_type"] in WHOLE_TYPES


def read_logits(path: str | Path) -> tuple[float, float]:
    """(logit_scale, logit_bias) of a whole checkpoint, read without loading the towers."""
    path = Path(path)
    weight_map = {}
    if (path / hub.INDEX).is_file():
        weight_map = json.loads((path / hub.INDEX).read_text())["weight_map"]
    values = []
    for name in ("logit_scale", "logit_bias"):
        file = path / weight_map.get(name, hub.SINGLE)
        keys = []
        if file.is_file():
            with safe_open(str(file), "pt") as f:
                keys = list(f.keys())
                if name in keys:
                    values.append(float(f.get_tensor(name).reshape(())))
        if name not in keys:
            raise ValueError(f"{path} has no `{name}` tensor: not a whole SiglipModel checkpoint")
    return values[0], values[1]


def save_whole(vision, text, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
               path: str | Path) -> None:  # fmt: skip
    """The towers and the two scalars as one SiglipModel checkpoint transformers loads."""
    vision_config, text_config = vision.hf_config(), text.hf_config()
    model_type = next(t for t in WHOLE_TYPES if t in type(text).TEXT_TOWER_OF)
    for config in (vision_config, text_config):
        config.pop("architectures", None)
    hub.write_config(
        {
            "model_type": model_type,
            "architectures": [WHOLE_TYPES[model_type]],
            "vision_config": vision_config,
            "text_config": text_config,
        },
        path,
    )
    state = {f"vision_model.{k}": v for k, v in vision.hf_state_dict().items()}
    state.update({f"text_model.{k}": v for k, v in text.hf_state_dict().items()})
    state["logit_scale"] = logit_scale.detach().reshape(1)  # transformers' shape: [1]
    state["logit_bias"] = logit_bias.detach().reshape(1)
    hub.save_state_dict(state, path)
