"""What `vlscale export` writes for transformers and the Hub (core/export.py) and `vlscale push`.

Image processors: transformers' AutoImageProcessor (PIL backend) on the exported
preprocessor_config.json gives vlscale's ImageLoader pixels within ATOL. Measured: at most
4.8e-7 with CLIP's mean/std, 1.2e-7 with SigLIP's 0.5 (float32 rounding of (x / 255 - mean) / std
computed in another order), over PNGs of 9-12 sizes up and down, both paths, SigLIP and ViT
towers; one intensity level is 1 / (255 * std) >= 7.8e-3 (std <= 0.5), so ATOL = 1e-5 lets no
real preprocessing difference pass. PNG, not JPEG: ImageLoader decodes a JPEG at least twice the
target size at a reduced scale (PIL draft), transformers at full size (measured on noise images:
up to 0.35, mean 0.06). Both truncate the longer side in the crop path (ImageLoader rounded it until
2026-12-02: 0.4-1.2 apart on the noise images where that differs, now in SHAPES).

The end-to-end checks of real exports are `check_siglip_export` (called from
tests/test_train.py's trained run) and tests/test_vlm_task.py's two-stage test. The upload itself
is not exercised (no network): an injected api object records the calls.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from core.data.chat import ChatProcessor
from core.data.preprocess import ImageLoader
from core.data.tokenizer import train_vlm_tokenizer
from core.export import save_image_processor, save_tokenizer

ATOL = 1e-5
SECRET = "hf_vlscaleTestSecretThatMustNotLeak"


def tower(kind: str, size: int):
    import core.models

    config = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": size, "patch_size": 8}  # fmt: skip
    if kind == "vit":  # CLIP's statistics: mean and std must reach the processor
        config.update(model_type="vit", image_mean=[0.48145466, 0.4578275, 0.40821073],
                      image_std=[0.26862954, 0.26130258, 0.27577711])  # fmt: skip
    else:
        config.update(model_type="siglip_vision_model", vision_use_head=False)
    return core.models.from_config(config)


def png(width: int, height: int, seed: int = 0) -> bytes:
    """Gradients plus noise: every resampling difference shows."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    image = np.stack([x, y, (x + y) / 2], axis=-1) + rng.normal(0, 40, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def processor_pixels(directory: Path, data: bytes) -> torch.Tensor:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(directory, backend="pil")
    out = processor(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]
    return torch.from_numpy(np.asarray(out))


SIZE = 32
# (97, 61), (61, 97), (37, 200): the longer side's exact size has a fraction >= 0.5, where
# rounding it (as ImageLoader once did) and truncating it (transformers) differ.
SHAPES = [(32, 32), (64, 32), (32, 96), (90, 70), (70, 90), (41, 200), (300, 200), (21, 25),
          (1000, 999), (97, 61), (61, 97), (37, 200)]  # fmt: skip


@pytest.mark.parametrize("family", ["siglip", "vit"])
@pytest.mark.parametrize("crop", [False, True])
def test_image_processor_reproduces_image_loader(tmp_path, family, crop):
    vision = tower(family, SIZE)
    save_image_processor(vision, tmp_path, crop=crop)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    expected = "CLIPImageProcessor" if crop else {"siglip": "SiglipImageProcessor",
                                                  "vit": "ViTImageProcessor"}[family]  # fmt: skip
    assert config["image_processor_type"] == expected and config["resample"] == 3
    loader = ImageLoader(SIZE, vision.image_mean, vision.image_std, crop=crop)
    worst = 0.0
    for width, height in SHAPES:
        data = png(width, height)
        ours, theirs = loader(data), processor_pixels(tmp_path, data)
        assert theirs.shape == ours.shape == (3, SIZE, SIZE)
        worst = max(worst, (ours - theirs).abs().max().item())
    assert worst <= ATOL, worst


def vlm_tokenizer(tmp_path: Path):
    texts = ["What colour is the square?", "red", "A blue circle left of a green triangle."]
    return train_vlm_tokenizer(texts * 20, tmp_path / "source", vocab_size=400)


CONVERSATION = [
    {"user": "What colour is the square?", "assistant": "red"},
    {"user": "And the circle? {{ braces }} 'quotes'", "assistant": "blue, naïvely"},
]


def messages(turns, images: int = 0, last_answer: bool = True) -> list[dict]:
    out = []
    for i, turn in enumerate(turns):
        content = turn["user"]
        if i == 0 and images:
            content = [{"type": "image"}] * images + [{"type": "text", "text": content}]
        out.append({"role": "user", "content": content})
        if last_answer or i < len(turns) - 1:
            out.append({"role": "assistant", "content": turn["assistant"]})
    return out


@pytest.mark.parametrize("system", ["You are a helpful assistant.", None, 'Say "{% x %}"\nnü'])
@pytest.mark.parametrize("source_template", [True, False])
def test_chat_template_renders_as_chat_processor(tmp_path, system, source_template):
    """The exported LM tokenizer's chat template gives ChatProcessor's text and ids: whole
    conversations (training), prompts (add_generation_prompt: generation), images (N pads)."""
    from transformers import AutoTokenizer

    tok = vlm_tokenizer(tmp_path)
    source = tok.chat_template
    if not source_template:
        tok.chat_template = None
    processor = ChatProcessor(tok, 4, system)
    save_tokenizer(tok, tmp_path / "lm", chat_template=processor.export_template())
    assert tok.chat_template == (source if source_template else None)  # the task's is untouched
    exported = AutoTokenizer.from_pretrained(tmp_path / "lm")
    for images in (0, 2):
        ids = processor.encode(CONVERSATION, images)[0]
        text = exported.apply_chat_template(messages(CONVERSATION, images), tokenize=False)
        assert text == tok.decode(ids)
        assert exported.encode(text, add_special_tokens=False) == ids
        prompt = processor.prompt(CONVERSATION, images)
        text = exported.apply_chat_template(
            messages(CONVERSATION, images, last_answer=False), tokenize=False,
            add_generation_prompt=True,
        )  # fmt: skip
        assert text == tok.decode(prompt)
        assert exported.encode(text, add_special_tokens=False) == prompt
    if source_template:  # the source tokenizer's own template stays available by name
        again = exported.apply_chat_template(
            messages(CONVERSATION), tokenize=False, chat_template="source"
        )
        assert again == tok.apply_chat_template(messages(CONVERSATION), tokenize=False)


class RecordingApi:
    """HfApi's three calls `vlscale push` makes, recorded; what upload_folder saw is listed
    while the folder exists (a run's export is a temporary directory)."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))

    def create_branch(self, *args, **kwargs):
        self.calls.append(("create_branch", args, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        folder = Path(kwargs["folder_path"])
        self.uploaded = read_tree(folder)
        return "https://huggingface.co/user/tiny/commit/0"


def check_card(out: Path, kind: str, tags: set[str], evaluation: dict) -> str:
    """README.md: Hub front matter, the eval.json metrics, the resolved config, and a loading
    snippet that loads every part (run here on the directory)."""
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and {"vlscale", kind} | tags <= set(meta["tags"])
    for key, value in evaluation.items():
        if key != "step" and isinstance(value, (int, float)):
            assert f"| {key} | {value:.4g} |" in body
    config = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(config) == yaml.safe_load((out / "config.yaml").read_text())
    snippet = body.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(snippet.replace('REPO = "path/to/export"', f"REPO = {str(out)!r}"), scope)
    return card


def check_no_secret(files: dict[str, bytes]) -> None:
    """HF_TOKEN (set to SECRET while exporting) is in no file."""
    for name, data in files.items():
        assert SECRET.encode() not in data, name


def read_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def check_siglip_export(run: Path, out: Path, monkeypatch) -> None:
    """A trained tiny SigLIP run (tests/test_train.py) exported: text/ loads with AutoTokenizer
    and tokenizes captions as training did, vision/'s AutoImageProcessor gives the training
    pixels, the model card is complete and holds no secret, and `vlscale push` (run directory:
    exported first) hands upload_folder the whole export."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from launch.cli import main
    from launch.export import consolidated, export
    from launch.push import push

    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = export(run, out)
    task = consolidated(run)[0].eval()
    decoder = task.decoder
    tok = AutoTokenizer.from_pretrained(out / "text")
    caption = "a red square above a blue circle"
    ids, mask = decoder.tokenize(caption)
    ours = ids[: int(mask.sum())].tolist()
    assert tok(caption)["input_ids"] + ([] if decoder.adds_eos else [tok.eos_token_id]) == ours

    processor = AutoImageProcessor.from_pretrained(out / "vision", backend="pil")
    assert type(processor).__name__.startswith("CLIPImageProcessor")  # shorter side + crop
    size = task.vision.image_size
    for data in (png(48, 40), png(size, size)):
        pixels = processor(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixels[0], decoder.load_image(data), rtol=0, atol=ATOL)
        with torch.no_grad():
            hidden = AutoModel.from_pretrained(out / "vision")(pixel_values=pixels)
            torch.testing.assert_close(hidden.last_hidden_state, task.vision(pixels),
                                       rtol=1e-4, atol=1e-4)  # fmt: skip

    evaluation = json.loads((run / "eval.json").read_text())
    card = check_card(out, "siglip", {"contrastive"}, evaluation)
    assert "bidirectional" in card  # the tiny text tower's attention, which transformers lacks
    check_no_secret(read_tree(out))

    api = RecordingApi()
    assert push(run, "user/tiny", api=api) == "https://huggingface.co/user/tiny/commit/0"
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == ("user/tiny",) and api.calls[0][2]["exist_ok"] is True
    assert api.calls[1][2]["repo_id"] == "user/tiny" and "token" not in api.calls[1][2]
    assert {"README.md", "config.yaml", "model.safetensors", "vision/config.json",
            "vision/preprocessor_config.json", "text/config.json", "text/tokenizer.json",
            "text/tokenizer_config.json"} <= api.uploaded.keys()  # fmt: skip
    assert api.uploaded["README.md"] == (out / "README.md").read_bytes()
    check_no_secret(api.uploaded)
    assert main(["push", str(out), "user/tiny", "--dry-run"]) == 0  # an export: no network


def test_push_refuses_what_is_neither_a_run_nor_an_export(tmp_path, capsys):
    from launch.cli import main

    assert main(["push", str(tmp_path), "user/tiny", "--dry-run"]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_push_commits_to_a_new_branch_of_a_private_repo(tmp_path):
    from launch.push import push

    export = tmp_path / "export"
    (export / "vision").mkdir(parents=True)
    for name in ("config.yaml", "model.safetensors", "README.md", "vision/config.json"):
        (export / name).write_text(name)
    api = RecordingApi()
    push(export, "user/tiny", private=True, revision="v1", api=api)
    assert [(c[0], c[1]) for c in api.calls] == [
        ("create_repo", ("user/tiny",)), ("create_branch", ("user/tiny",)), ("upload_folder", ())
    ]  # fmt: skip
    assert api.calls[0][2]["private"] is True and api.calls[1][2]["branch"] == "v1"
    assert api.calls[2][2]["revision"] == "v1"
    assert sorted(api.uploaded) == sorted(["config.yaml", "model.safetensors", "README.md",
                                           "vision/config.json"])  # fmt: skip
    listing = push(export, "user/tiny", revision="v1", dry_run=True)
    assert re.search(r"would upload .* to user/tiny@v1", listing) and "README.md" in listing


def test_card_names_only_hub_models_and_datasets(tmp_path, monkeypatch):
    from core.export import dataset_ids, hub_ids

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt" / "qwen").mkdir(parents=True)  # a local owner/name-shaped directory
    sources = ["google/siglip-base-patch16-224", "ckpt/qwen", "/abs/tower", "runs/a/vision", ""]
    assert hub_ids(*sources) == ["google/siglip-base-patch16-224"]
    urls = [
        "hf://datasets/HuggingFaceM4/FineVision@main/data/{subset}/*.parquet",
        "pipe:curl -sL https://huggingface.co/datasets/pixparse/cc3m-wds/resolve/main/x.tar",
        "data/finevision/{subset}/train-*.tar",
    ]
    assert dataset_ids(*urls) == ["HuggingFaceM4/FineVision", "pixparse/cc3m-wds"]
