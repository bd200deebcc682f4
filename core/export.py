"""What `vlscale export` writes beside the towers' weights, so that transformers and the Hub load
an export without vlscale: tokenizer files, image processor configs, generation configs and a
model card. Tasks call the tower helpers from `export_hf` (they know which tokenizer, image
loader and end-of-turn token each directory goes with); launch/export.py writes the card.

Image processors reproduce vlscale's own preprocessing (core/data/preprocess.py ImageLoader),
with transformers' PIL backend: `crop=False` (the VLM's) resizes to S x S bicubically, as
SiglipImageProcessor / ViTImageProcessor do; `crop=True` (the contrastive towers') resizes the
shorter side to S and centre-crops, as CLIPImageProcessor does. Both then rescale by 1/255 and
normalise with the tower's mean and std (both truncate the longer side of a crop=True resize).
Known differences (tests/test_export.py): transformers composites
transparent images on white where ImageLoader drops the alpha channel; ImageLoader decodes large
JPEGs at a reduced scale (PIL draft) first; and transformers' torchvision backend (its default
when torchvision is installed) resamples differently from PIL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as transformers stores `resample`
REPO = "path/to/export"  # the model card's placeholder for the directory or Hub repo id


# ---------------------------------------------------------------------------- towers


def image_processor_config(tower, crop: bool) -> dict[str, Any]:
    """preprocessor_config.json for a vision tower (image_size, image_mean/std, MODEL_TYPES) whose
    images are prepared by `ImageLoader(crop=crop)`."""
    size = tower.image_size
    config: dict[str, Any] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(tower.image_mean),
        "image_std": list(tower.image_std),
    }
    if crop:  # shorter side to S, then the centre S x S (neither SigLIP's nor ViT's can crop)
        config.update(
            image_processor_type="CLIPImageProcessor",
            size={"shortest_edge": size},
            do_center_crop=True,
            crop_size={"height": size, "width": size},
        )
    else:
        siglip = tower.MODEL_TYPES[0].startswith("siglip")
        config.update(
            image_processor_type="SiglipImageProcessor" if siglip else "ViTImageProcessor",
            size={"height": size, "width": size},
            do_center_crop=False,
        )
    return config


def save_image_processor(tower, path: str | Path, crop: bool) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = json.dumps(image_processor_config(tower, crop), indent=2)
    (path / "preprocessor_config.json").write_text(config + "\n")


def save_tokenizer(tokenizer, path: str | Path, chat_template: str | None = None) -> None:
    """The tokenizer's files (`save_pretrained`), as the task used it (pad token included).
    `chat_template` becomes the default template; a different one the tokenizer had is kept
    under the name "source" (`apply_chat_template(..., chat_template="source")`)."""
    if chat_template is None:
        tokenizer.save_pretrained(str(path))
        return
    source = tokenizer.chat_template
    templates: str | dict[str, str] = chat_template
    if source and source != chat_template:
        named = source if isinstance(source, dict) else {"default": source}
        templates = {"default": chat_template}
        templates.update({"source" if k == "default" else k: v for k, v in named.items()})
    tokenizer.chat_template = templates
    try:
        tokenizer.save_pretrained(str(path))
    finally:
        tokenizer.chat_template = source


def save_generation_config(
    path: str | Path, *, eos_token_id: int, pad_token_id: int | None,
    bos_token_id: int | None = None, max_new_tokens: int = 512,
) -> None:  # fmt: skip
    """generation_config.json: greedy decoding (as vlscale evaluates) that stops at
    `eos_token_id`."""
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    ).save_pretrained(str(path))


# ---------------------------------------------------------------------------- model card


def hub_ids(*sources: str) -> list[str]:
    """The sources that are Hugging Face hub ids (owner/name, not a local path)."""
    found = []
    for source in sources:
        if not source or source.startswith((".", "/", "~")) or source.count("/") != 1:
            continue
        if not Path(source).expanduser().exists() and source not in found:
            found.append(source)
    return found


def dataset_ids(*urls: str) -> list[str]:
    """Hub dataset ids named by data URLs (hf://datasets/owner/name/..., or
    https://huggingface.co/datasets/owner/name/...)."""
    found = []
    for url in urls:
        for marker in ("hf://datasets/", "huggingface.co/datasets/"):
            if marker in (url or ""):
                parts = url.split(marker, 1)[1].split("/")
                name = "/".join(parts[:2]).split("@")[0]  # owner/name@revision
                if len(parts) >= 2 and name not in found:
                    found.append(name)
    return found


def _load_lines(out: Path) -> tuple[list[str], list[str], set[str]]:
    """(rows of the contents table, lines of the loading snippet, the names it imports) for what
    `out` holds."""
    rows, code, names = [], [], set()
    for entry in sorted(out.iterdir()):
        name = entry.name
        if entry.is_dir() and (entry / "adapter_config.json").is_file():
            base = json.loads((entry / "adapter_config.json").read_text())
            base = Path(base.get("base_model_name_or_path") or "").name
            rows.append(f"| `{name}/` | peft LoRA adapter on `{base}/` | `PeftModel` |")
            code += [f"{name} = PeftModel.from_pretrained(",
                     f'    AutoModelForCausalLM.from_pretrained(REPO, subfolder="{base}"),',
                     f'    REPO, subfolder="{name}")']  # fmt: skip
            names |= {"PeftModel", "AutoModelForCausalLM"}
        elif entry.is_dir() and (entry / "config.json").is_file():
            config = json.loads((entry / "config.json").read_text())
            arch = (config.get("architectures") or ["?"])[0]
            auto = "AutoModelForCausalLM" if arch.endswith("ForCausalLM") else "AutoModel"
            parts = [f"`{auto}` ({arch})"]
            code.append(f'{name} = {auto}.from_pretrained(REPO, subfolder="{name}")')
            names.add(auto)
            if (entry / "tokenizer_config.json").is_file():
                parts.append("`AutoTokenizer`")
                code.append(f"{name}_tokenizer = AutoTokenizer.from_pretrained(REPO, "
                            f'subfolder="{name}")')  # fmt: skip
                names.add("AutoTokenizer")
            if (entry / "preprocessor_config.json").is_file():
                kind = json.loads((entry / "preprocessor_config.json").read_text())
                parts.append(f"`AutoImageProcessor` ({kind['image_processor_type']})")
                code += [  # the PIL backend is vlscale's preprocessing (4.x: use_fast=False)
                    f"{name}_processor = AutoImageProcessor.from_pretrained(",
                    f'    REPO, subfolder="{name}", backend="pil")',
                ]
                names.add("AutoImageProcessor")
            if (entry / "generation_config.json").is_file():
                parts.append("`GenerationConfig`")
                code.append(f"{name}_generation = GenerationConfig.from_pretrained(REPO, "
                            f'subfolder="{name}")')  # fmt: skip
                names.add("GenerationConfig")
            rows.append(f"| `{name}/` | Hugging Face checkpoint | {', '.join(parts)} |")
        elif name == "model.safetensors.index.json":  # the task's tensors, sharded
            shards = sorted(set(json.loads(entry.read_text())["weight_map"].values()))
            rows.append(f"| `{name}` | every tensor of the task, in {len(shards)} shards "
                        "(`model-*.safetensors`) | `safetensors.torch.load_file` |")  # fmt: skip
            code += ["state = {}",
                     f'for shard in sorted(set(json.load(open(path("{name}")))["weight_map"]'
                     ".values())):",
                     "    state.update(load_file(path(shard)))"]  # fmt: skip
            names |= {"load_file", "json"}
        elif re.fullmatch(r"model-\d+-of-\d+\.safetensors", name):
            continue  # listed with the index
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(entry), "pt") as f:
                tops = sorted({key.split(".")[0] for key in f.keys()})  # noqa: SIM118
            rows.append(f"| `{name}` | tensors under {', '.join(f'`{t}.*`' for t in tops)} "
                        "| `safetensors.torch.load_file` |")  # fmt: skip
            var = "state" if name == "model.safetensors" else name.removesuffix(".safetensors")
            code.append(f'{var.replace("-", "_")} = load_file(path("{name}"))')
            names.add("load_file")
        elif name == "config.yaml":
            rows.append("| `config.yaml` | the run's resolved vlscale config | `yaml.safe_load` |")
    return rows, code, names


def _imports(names: set[str]) -> list[str]:
    lines = ["import json", "import os", ""] if "json" in names else ["import os", ""]
    if "load_file" in names:
        lines.append("from huggingface_hub import hf_hub_download")
    if "PeftModel" in names:
        lines.append("from peft import PeftModel")
    if "load_file" in names:
        lines.append("from safetensors.torch import load_file")
    auto = sorted(names - {"PeftModel", "load_file", "json"})
    if auto:
        lines.append(f"from transformers import {', '.join(auto)}")
    return lines


def model_card(out: str | Path, cfg, *, step: int, evaluation: dict | None,
               tags: Sequence[str] = (), notes: str = "") -> str:  # fmt: skip
    """OUT/README.md for what `out` holds now: Hub front matter (library_name, tags, base_model
    and datasets when they are hub ids), the contents and how to load each part, the task's
    notes, the training data, the run's last evaluation and its resolved config. Nothing but
    the config and eval.json is read: no environment, no credentials."""
    out = Path(out)
    tags = list(dict.fromkeys(["vlscale", cfg.task.kind, *tags]))
    meta: dict[str, Any] = {"library_name": "transformers", "tags": tags}
    model = cfg.model
    bases = hub_ids(model.vision, model.text)
    if bases:
        meta["base_model"] = bases
    datasets = dataset_ids(cfg.data.train, cfg.data.val)
    if datasets:
        meta["datasets"] = datasets
    rows, code, names = _load_lines(out)
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {cfg.name}", "",
        f"A `task.kind: {cfg.task.kind}` model trained with vlscale, exported (`vlscale export`) "
        f"from its checkpoint of step {step}.", "",
        "## Contents", "",
        "| path | what | load with |", "|---|---|---|", *rows, "",
        "`model.safetensors` (or its shards) holds every tensor of the task under its vlscale "
        "module names "
        "(`core.models.from_pretrained` also reads each Hugging Face directory).", "",
        "```python", *_imports(names), "",
        f'REPO = "{REPO}"  # this directory, or its Hub repo id', "",
        "def path(name):  # a file of the export, local or from the Hub",
        "    local = os.path.join(REPO, name)",
        "    return local if os.path.isdir(REPO) else hf_hub_download(REPO, name)",
        "", "", *code, "```", "",
    ]  # fmt: skip
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    data = cfg.data
    lines += ["## Training data", "", f"- train: `{data.train}`", f"- val: `{data.val}`"]
    mixture = getattr(data, "mixture", None)
    if mixture:
        lines.append("- mixture (sampling weights): " + ", ".join(
            f"`{name}` {weight}" for name, weight in mixture.items()))  # fmt: skip
    lines.append("")
    lines += ["## Evaluation", ""]
    if evaluation:
        at = evaluation.get("step")
        where = f"step {at}" + ("" if at in (None, step) else f"; this export is step {step}")
        lines += [f"The run's last evaluation (`eval.json`, {where}):", "",
                  "| metric | value |", "|---|---|"]  # fmt: skip
        for key, value in evaluation.items():
            if key != "step" and isinstance(value, (int, float)):
                lines.append(f"| {key} | {value:.4g} |")
    else:
        lines.append("The run wrote no evaluation (no `eval.json`).")
    lines += ["", "## Training configuration", "", "The run's resolved config (`config.yaml`):",
              "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]  # fmt: skip
    return "\n".join(lines)
