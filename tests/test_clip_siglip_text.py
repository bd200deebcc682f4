"""CLIP's vision tower, SigLIP's text tower and a whole SigLIP against `transformers`: tiny random
checkpoints saved by transformers, loaded through core.models from every layout transformers
saves them in, compared in fp32 and saved back; LLaVA-style vision features for the VLM; a whole
SigLIP trained contrastively for a few steps, exported, and reloaded by transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_vision import TINY, _maxdiff, _pixels, _randomize, _save
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from core import models
from core.config import ConfigError
from core.models.text import SiglipText
from core.models.vision import CLIPVision, SiglipVision, ViT
from core.recipe import load_config

TOL = 1e-5
TEXT = {k: v for k, v in TINY.items() if k != "patch_size"}
TEXT_LEN = 16
SMALL_VOCAB = dict(vocab_size=100, max_position_embeddings=TEXT_LEN, bos_token_id=None,
                   eos_token_id=2, pad_token_id=1)  # fmt: skip


def _ids(vocab: int, batch: int = 3, length: int = TEXT_LEN) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    cfg = CLIPVisionConfig(**TINY, image_size=32)
    return _save(CLIPVisionModel(cfg), tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def siglip_text_dir(tmp_path_factory):
    cfg = SiglipTextConfig(**TEXT, **SMALL_VOCAB, projection_size=24)
    return _save(SiglipTextModel(cfg), tmp_path_factory.mktemp("siglip_text"))


# ---------------------------------------------------------------------------------- CLIP
def test_clip_matches_transformers(clip_dir):
    ours, ref = models.from_pretrained(clip_dir), CLIPVisionModel.from_pretrained(clip_dir).eval()
    assert isinstance(ours, CLIPVision) and ours.has_cls_token and not ours.has_head
    assert (ours.hidden_size, ours.image_size, ours.patch_size, ours.num_tokens) == (32, 32, 8, 17)
    assert ours.image_mean == (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's
    x = _pixels(32)
    with torch.no_grad():
        hidden, expected = ours(x), ref(x, output_hidden_states=True)
        assert hidden.shape == (2, 17, 32)
        assert _maxdiff(hidden, expected.last_hidden_state) <= TOL  # no final LayerNorm
        assert _maxdiff(ours.pool(hidden), expected.pooler_output) <= TOL  # post_layernorm(CLS)
        assert len(expected.hidden_states) == 3
        for layer in (0, 1, 2, -1, -2, -3):  # 0: after pre_layrnorm
            got = ours.hidden_state(x, layer)
            assert _maxdiff(got, expected.hidden_states[layer]) <= TOL, layer
    with pytest.raises(ValueError, match=r"layer 3 is out of range for 2 blocks: -3..2"):
        ours.hidden_state(x, 3)


@pytest.mark.parametrize("size", [(16, 16), (48, 48), (40, 56)])
def test_clip_interpolated_positions_match_transformers(clip_dir, size):
    ours, ref = models.from_pretrained(clip_dir), CLIPVisionModel.from_pretrained(clip_dir).eval()
    x = _pixels(*size)
    with torch.no_grad():
        expected = ref(x, interpolate_pos_encoding=True)
        hidden = ours(x)
        assert _maxdiff(hidden, expected.last_hidden_state) <= TOL
        assert _maxdiff(ours.pool(hidden), expected.pooler_output) <= TOL


def test_clip_save_pretrained_loads_in_transformers(clip_dir, tmp_path):
    ours = models.from_pretrained(clip_dir)
    models.save_pretrained(ours, tmp_path)
    ref, info = CLIPVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = _pixels(32)
    with torch.no_grad():
        expected = ref.eval()(x)
        assert _maxdiff(ours(x), expected.last_hidden_state) <= TOL
        assert _maxdiff(ours.pool(ours(x)), expected.pooler_output) <= TOL


def test_clip_set_image_size_resamples_positions_for_good(clip_dir, tmp_path):
    ours, ref = models.from_pretrained(clip_dir), CLIPVisionModel.from_pretrained(clip_dir).eval()
    ours.set_image_size(48)
    assert (ours.image_size, ours.num_tokens) == (48, 37)
    models.save_pretrained(ours, tmp_path)
    native = CLIPVisionModel.from_pretrained(tmp_path).eval()  # a 48-px model
    x = _pixels(48)
    with torch.no_grad():
        expected = ref(x, interpolate_pos_encoding=True).last_hidden_state
        assert _maxdiff(ours(x), expected) <= TOL
        assert _maxdiff(native(x).last_hidden_state, expected) <= TOL


# openai/clip-vit-large-patch14-336 (LLaVA-1.5's tower): config.json's keys that shape the model.
CLIP_L_336 = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 768,
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "projection_dim": 768},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
                      "projection_dim": 768},
}  # fmt: skip


def test_clip_hub_config_builds_with_transformers_defaults():
    with torch.device("meta"):
        model = models.from_config(CLIP_L_336)
    assert type(model) is CLIPVision
    table = model.embeddings.position_embedding.weight
    got = (model.hidden_size, model.image_size, model.patch_size, len(model.blocks), len(table))
    assert got == (1024, 336, 14, 24, 577)
    hf = CLIPConfig(**{k: v for k, v in CLIP_L_336.items() if k != "model_type"}).vision_config
    for key, value in model.hf_config().items():
        if key not in ("model_type", "architectures", "image_mean", "image_std"):
            assert getattr(hf, key) == value, key


# ---------------------------------------------------------------------------------- layouts
def _vit(layout):
    cfg = ViTConfig(**TINY, image_size=32)
    if layout == "base":
        return ViTModel(cfg), lambda m, x: m(x).last_hidden_state
    model = ViTForImageClassification(ViTConfig(**TINY, image_size=32, num_labels=3))
    return model, lambda m, x: m.vit(x).last_hidden_state


def _siglip(layout):
    vision = dict(TINY, image_size=32)
    if layout == "base":
        return SiglipVisionModel(SiglipVisionConfig(**vision)), lambda m, x: m(x).pooler_output
    cfg = SiglipConfig(vision_config=vision, text_config=dict(TEXT, vocab_size=50))
    return SiglipModel(cfg), lambda m, x: m.get_image_features(x).pooler_output


def _clip(layout):
    vision = dict(TINY, image_size=32, projection_dim=16)
    if layout == "base":
        return CLIPVisionModel(CLIPVisionConfig(**vision)), lambda m, x: m(x).pooler_output
    if layout == "projection":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
        return model, lambda m, x: m.vision_model(x).pooler_output
    cfg = CLIPConfig(vision_config=vision, text_config=dict(TEXT, vocab_size=50),
                     projection_dim=16)  # fmt: skip
    return CLIPModel(cfg), lambda m, x: m.vision_model(x).pooler_output


@pytest.mark.parametrize(
    "family, layout, cls",
    [
        (_vit, "base", ViT), (_vit, "ViTForImageClassification", ViT),
        (_siglip, "base", SiglipVision), (_siglip, "SiglipModel", SiglipVision),
        (_clip, "base", CLIPVision), (_clip, "CLIPModel", CLIPVision),
        (_clip, "projection", CLIPVision),
    ],
)  # fmt: skip
def test_vision_towers_load_from_base_and_wrapper_layouts(family, layout, cls, tmp_path):
    """Each tower from its base model's checkpoint and from the wrappers transformers saves it
    in (a task head, a whole two-tower model): the tower's output equals transformers' (pooled
    where the tower has a pooler; ViT's classifier layout has none)."""
    model, reference = family(layout)
    path = _save(model, tmp_path)
    model = type(model).from_pretrained(path).eval()
    ours = models.from_pretrained(path)
    assert type(ours) is cls
    x = _pixels(32)
    with torch.no_grad():
        got = ours(x) if cls is ViT else ours.pool(ours(x))
        assert _maxdiff(got, reference(model, x)) <= TOL


def test_transformers_4_clip_layout_with_position_ids(clip_dir, tmp_path):
    # transformers 4 saved CLIPVisionModel under `vision_model.`, older versions with the
    # position_ids buffer.
    shutil.copy(f"{clip_dir}/config.json", tmp_path)
    state = load_file(f"{clip_dir}/model.safetensors")
    old = {f"vision_model.{k}": v for k, v in state.items()}
    old["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, ref = models.from_pretrained(tmp_path), CLIPVisionModel.from_pretrained(clip_dir).eval()
    x = _pixels(32)
    with torch.no_grad():
        assert _maxdiff(ours(x), ref(x).last_hidden_state) <= TOL


@pytest.mark.parametrize("model_type", ["vit", "siglip_vision_model"])
def test_hidden_state_matches_transformers_hidden_states(model_type, vit_dir, siglip_dir):
    path = vit_dir if model_type == "vit" else siglip_dir
    reference = ViTModel if model_type == "vit" else SiglipVisionModel
    ours, ref = models.from_pretrained(path), reference.from_pretrained(path).eval()
    x = _pixels(32)
    with torch.no_grad():
        expected = ref(x, output_hidden_states=True).hidden_states
        for layer in (0, 1, -1, -2):
            assert _maxdiff(ours.hidden_state(x, layer), expected[layer]) <= TOL


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return _save(ViTModel(ViTConfig(**TINY, image_size=32)), tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    cfg = SiglipVisionConfig(**TINY, image_size=32)
    return _save(SiglipVisionModel(cfg), tmp_path_factory.mktemp("siglip"))


# ---------------------------------------------------------------------------------- SigLIP text
def test_siglip_text_matches_transformers(siglip_text_dir):
    ours = models.from_pretrained(siglip_text_dir)
    ref = SiglipTextModel.from_pretrained(siglip_text_dir).eval()
    assert isinstance(ours, SiglipText)
    assert (ours.hidden_size, ours.pooled_size, ours.pad_to_length, len(ours.layers)) == (
        32, 24, TEXT_LEN, 2)  # fmt: skip
    ids = _ids(100)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # right padding, as a tokenizer without max_length padding gives
    with torch.no_grad():
        for attention_mask in (None, mask):  # SigLIP runs with none
            hidden = ours(ids, attention_mask=attention_mask)
            expected = ref(input_ids=ids, attention_mask=attention_mask)
            assert _maxdiff(hidden, expected.last_hidden_state) <= TOL
            assert _maxdiff(ours.pool(hidden), expected.pooler_output) <= TOL  # head(last)
        shorter = ours(ids[:, :10])  # positions 0..9 of the table
        assert _maxdiff(shorter, ref(input_ids=ids[:, :10]).last_hidden_state) <= TOL
    with pytest.raises(ValueError, match="longer than max_position_embeddings=16"):
        ours(_ids(100, length=17))
    with pytest.raises(ValueError, match="bidirectional"):
        ours(ids, mask_kind="causal")


def test_siglip_text_save_pretrained_loads_in_transformers(siglip_text_dir, tmp_path):
    ours = models.from_pretrained(siglip_text_dir)
    models.save_pretrained(ours, tmp_path)
    ref, info = SiglipTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = _ids(100)
    with torch.no_grad():
        expected = ref.eval()(input_ids=ids)
        assert _maxdiff(ours(ids), expected.last_hidden_state) <= TOL
        assert _maxdiff(ours.pool(ours(ids)), expected.pooler_output) <= TOL


def test_siglip_text_transformers_4_layout(siglip_text_dir, tmp_path):
    shutil.copy(f"{siglip_text_dir}/config.json", tmp_path)
    state = load_file(f"{siglip_text_dir}/model.safetensors")
    save_file({f"text_model.{k}": v for k, v in state.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    ours, ref = models.from_pretrained(tmp_path), SiglipTextModel.from_pretrained(siglip_text_dir)
    ids = _ids(100)
    with torch.no_grad():
        assert _maxdiff(ours.pool(ours(ids)), ref.eval()(input_ids=ids).pooler_output) <= TOL


def test_part_text_of_two_tower_checkpoints(tmp_path, clip_dir):
    cfg = SiglipConfig(
        vision_config=dict(TINY, image_size=32), text_config=dict(TEXT, **SMALL_VOCAB)
    )
    path = _save(SiglipModel(cfg), tmp_path)
    ref = SiglipModel.from_pretrained(path).eval()
    text, vision = models.from_pretrained(path, part="text"), models.from_pretrained(path)
    assert isinstance(text, SiglipText) and isinstance(vision, SiglipVision)
    ids = _ids(100)
    with torch.no_grad():
        assert _maxdiff(text.pool(text(ids)), ref.get_text_features(ids).pooler_output) <= TOL
    with pytest.raises(ValueError, match="'clip_vision_model' has no text tower here.*siglip"):
        models.from_pretrained(clip_dir, part="text")
    with pytest.raises(ValueError, match="unknown part 'audio'"):
        models.from_pretrained(path, part="audio")


# ---------------------------------------------------------------------------------- VLM
def test_vlm_reads_clip_penultimate_layer_without_cls(vqa, clip_dir, tmp_path):
    """LLaVA-1.5's features: CLIP's hidden_states[-2], CLS dropped, into the projector."""
    from test_vlm_task import vlm_task

    ref = CLIPVisionModel.from_pretrained(clip_dir).eval()
    x = _pixels(32)
    for layer, expected in ((-2, lambda out: out.hidden_states[-2]),
                            (0, lambda out: out.last_hidden_state)):  # fmt: skip
        over = {"model.vision": clip_dir, "task.vision_feature_layer": layer}
        task = vlm_task(vqa, tmp_path, **over).eval()
        assert isinstance(task.vision, CLIPVision) and task.tokens_per_image == 4
        with torch.no_grad():
            features = expected(ref(x, output_hidden_states=True))[:, 1:]
            assert _maxdiff(task.embed_images(x), task.projector(features)) <= TOL
    with pytest.raises(ConfigError, match=r"vision_feature_layer=3: .* 2 blocks; valid: -2..2"):
        vlm_task(vqa, tmp_path, **{"model.vision": clip_dir, "task.vision_feature_layer": 3})


# ---------------------------------------------------------------------------------- whole SigLIP
WHOLE = {"task.pooling": "map", "task.text_pooling": "tower",
         "task.text_attention": "bidirectional", "task.embed_dim": 0}  # fmt: skip


@pytest.fixture(scope="module")
def whole_dir(tmp_path_factory, shapes_dir, shapes_tokenizer):
    """A tiny SiglipModel whose text tower has the shapes tokenizer's vocabulary; logit
    scale/bias not transformers' zeros, so that taking them over is visible."""
    tok = shapes_tokenizer
    text = dict(TEXT, vocab_size=len(tok), max_position_embeddings=TEXT_LEN, bos_token_id=None,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    cfg = SiglipConfig(vision_config=dict(TINY, image_size=32), text_config=text)
    model = _randomize(SiglipModel(cfg))
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
        model.logit_bias.fill_(-3.0)
    path = tmp_path_factory.mktemp("whole")
    model.save_pretrained(path)
    return path


def whole_overrides(shapes_dir, whole_dir, run_dir, steps: int = 4, **extra) -> list[str]:
    over = {
        "run_dir": str(run_dir),
        "model.vision": str(whole_dir),
        "model.text": str(whole_dir),
        "model.tokenizer": str(shapes_dir / "tokenizer"),
        **WHOLE,
        "data.train": str(shapes_dir / "train-{000000..000002}.tar"),
        "data.val": str(shapes_dir / "val-000000.tar"),
        "data.max_text_len": TEXT_LEN,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "optim.max_steps": steps,
        "optim.warmup_steps": 1,
        "optim.lr": 1e-3,
        "logging.every": 1,
        "logging.progress": "false",
        "logging.wandb.mode": "disabled",
        "logging.report": "false",  # ~1 s a run; drawn by test_loss_goes_down_and_eval_is_written
        "checkpoint.every": steps,
        "eval.every": 0,
    }
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def _build(shapes_dir, whole_dir, tmp_path, **extra):
    from core.tasks import build_task

    over = whole_overrides(shapes_dir, whole_dir, tmp_path / "run", **extra)
    return build_task(load_config("tiny_siglip", over))


def _reference_outputs(ref: SiglipModel, pixels, input_ids):
    """transformers' SiglipModel as its docs call it: max_length-padded ids, no attention mask."""
    out = ref(pixel_values=pixels, input_ids=input_ids)
    return out.image_embeds, out.text_embeds, out.logits_per_image


def _our_outputs(task, pixels, input_ids, attention_mask):
    image = task.encode_image(pixels)
    text = task.encode_text(input_ids, attention_mask)
    logits = image @ text.T * task.logit_scale.exp() + task.logit_bias
    return image, text, logits


def _val_batch(task, shapes_dir, n: int = 6):
    from core.data.shards import open_shard

    shard = open_shard(str(shapes_dir / "val-000000.tar"))
    samples = [task.decoder(shard.read(i)) for i in range(n)]
    pixels = torch.stack([s["pixel_values"] for s in samples])
    ids = torch.stack([s["input_ids"] for s in samples])
    mask = torch.stack([s["attention_mask"] for s in samples])
    return pixels, ids, mask


def test_whole_siglip_loads_as_siglip_model(shapes_dir, whole_dir, tmp_path):
    """recipes/siglip_base_finetune.yaml's settings, on the tiny checkpoint: SiglipModel."""
    from core.tasks import build_task

    over = whole_overrides(shapes_dir, whole_dir, tmp_path / "run")
    over = [o for o in over if o.split("=")[0] not in WHOLE]  # the recipe's own
    task = build_task(load_config("siglip_base_finetune", over)).eval()
    assert task.whole and task.image_proj is None and task.text_proj is None
    assert isinstance(task.vision, SiglipVision) and isinstance(task.text, SiglipText)
    assert not any(k.startswith(("image_proj", "text_proj")) for k in task.state_dict())
    assert (task.logit_scale.item(), task.logit_bias.item()) == (2.5, -3.0)
    pixels, ids, mask = _val_batch(task, shapes_dir)
    assert ids.shape[1] == TEXT_LEN and not mask.all()  # padded: the padding is read too
    ref = SiglipModel.from_pretrained(whole_dir).eval()
    with torch.no_grad():
        theirs = _reference_outputs(ref, pixels, ids)
        for ours, expected in zip(_our_outputs(task, pixels, ids, mask), theirs, strict=True):
            assert _maxdiff(ours, expected) <= TOL


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"task.pooling": "mean"}, r"set task.pooling: map, .*embed_dim: 0 \(not pooling=mean\)"),
        ({"task.embed_dim": 64}, r"\(not embed_dim=64\)"),
        ({"task.init_logit_scale": 1.0}, r"drop task.init_logit_scale: the checkpoint's own"),
        ({"task.text_pooling": "mean"}, r"\(not text_pooling=mean\)"),
        ({"data.max_text_len": 12}, r"data.max_text_len=12: SiglipText reads captions padded "
                                    r"to 16 tokens .* set data.max_text_len: 16"),
    ],
)  # fmt: skip
def test_whole_siglip_config_errors(shapes_dir, whole_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        _build(shapes_dir, whole_dir, tmp_path, **extra)


def test_siglip_text_tower_settings(shapes_dir, whole_dir, siglip_text_dir, clip_dir, tmp_path):
    """A SigLIP text tower on its own (beside another image tower) pools with its head; a
    decoder text tower has no pooled output."""
    base = {"model.vision": clip_dir, "model.text": siglip_text_dir, "task.embed_dim": 8,
            "task.text_attention": "bidirectional", "task.text_pooling": "tower",
            "task.pooling": "mean"}  # fmt: skip
    task = _build(shapes_dir, whole_dir, tmp_path, **base)
    assert not task.whole and task.text_proj.in_features == 24  # projection_size
    with pytest.raises(ConfigError, match="pools with its own head .* task.text_pooling: tower"):
        _build(shapes_dir, whole_dir, tmp_path, **{**base, "task.text_pooling": "last"})
    with pytest.raises(ConfigError, match="SiglipText runs bidirectional attention"):
        _build(shapes_dir, whole_dir, tmp_path, **{**base, "task.text_attention": "causal"})
    with pytest.raises(ConfigError, match="embed_dim=0 .* image 32, text 24"):
        _build(shapes_dir, whole_dir, tmp_path, **{**base, "task.embed_dim": 0})
    qwen = {"model.vision": clip_dir, "model.text": "", "task.embed_dim": 8,
            "model.text_config.hidden_size": 32, "model.text_config.intermediate_size": 64,
            "model.text_config.num_hidden_layers": 1, "model.text_config.num_attention_heads": 2,
            "model.text_config.num_key_value_heads": 1, "model.text_config.head_dim": 16,
            "task.text_pooling": "tower", "task.pooling": "mean"}  # fmt: skip
    with pytest.raises(ConfigError, match="text_pooling=tower needs .* Decoder has none"):
        _build(shapes_dir, whole_dir, tmp_path, **qwen)
    with pytest.raises(ConfigError, match="only a whole SigLIP .* loads as both towers"):
        _build(shapes_dir, whole_dir, tmp_path, **{"model.vision": clip_dir,
                                                   "model.text": clip_dir})  # fmt: skip


def test_whole_siglip_trains_and_exports_a_siglip_model(shapes_dir, whole_dir, tmp_path):
    """A few contrastive steps of the whole model, then `vlscale export`: OUT/siglip loads in
    transformers' SiglipModel, whose embeddings and logits equal the trained task's."""
    from core.loop import train
    from launch.export import consolidated, export

    run = tmp_path / "run"
    train(load_config("tiny_siglip", whole_overrides(shapes_dir, whole_dir, run, steps=4)))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    out = export(run, tmp_path / "export")
    task = consolidated(run)[0].eval()
    source = SiglipModel.from_pretrained(whole_dir)
    assert task.logit_scale.item() != 2.5  # it trained, from the checkpoint's value
    moved = task.text.head.weight - source.text_model.head.weight
    assert moved.abs().max() > 0

    ref, info = SiglipModel.from_pretrained(out / "siglip", output_loading_info=True)
    assert not any(info.values()), info
    pixels, ids, mask = _val_batch(task, shapes_dir)
    with torch.no_grad():
        theirs = _reference_outputs(ref.eval(), pixels, ids)
        for ours, expected in zip(_our_outputs(task, pixels, ids, mask), theirs, strict=True):
            assert _maxdiff(ours, expected) <= TOL
    # Its tokenizer pads as training did; core.models reads each tower back.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "siglip")
    caption = "a red square above a blue circle"
    expected, real = task.decoder.tokenize(caption)
    eos = [] if task.decoder.adds_eos else [tok.eos_token_id]  # vlscale appends it if needed
    assert tok(caption)["input_ids"] + eos == expected[: int(real.sum())].tolist()
    assert len(tok(caption, padding="max_length")["input_ids"]) == TEXT_LEN
    assert isinstance(models.from_pretrained(out / "siglip", part="text"), SiglipText)
    card = (out / "README.md").read_text()
    assert "`SiglipModel`" in card and 'padding="max_length"' in card
    assert not (out / "vision").exists() and not (out / "text").exists()


def test_clip_and_siglip_text_task_flops_match_torch_count(
    shapes_dir, whole_dir, siglip_text_dir, clip_dir, tmp_path
):
    """Model FLOPs of a CLIP image tower + SigLIP text tower: every caption position is input
    (padding included), the text head runs once per caption; all but the loss's [B, B] matmul."""
    from test_flops import _task_step, counted

    over = {"model.vision": clip_dir, "model.text": siglip_text_dir, "task.embed_dim": 8,
            "task.text_attention": "bidirectional", "task.text_pooling": "tower",
            "task.pooling": "mean"}  # fmt: skip
    task = _build(shapes_dir, whole_dir, tmp_path, **over)
    g = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(1, 3, 32, 32, generator=g),
        "input_ids": torch.randint(0, 100, (1, TEXT_LEN), generator=g),
        "attention_mask": (torch.arange(TEXT_LEN) < 5).long()[None],  # 5 real tokens
    }
    loss_matmul = 2 * 1 * 1 * 8 * 3  # [1, 8] x [8, 1], forward + backward
    # core/flops.py counts the patch-embedding stem for all 1 + 16 tokens, CLS included (as for
    # ViT): its forward and weight gradient once more than run, 1/17 of the stem's FLOPs.
    stem = task.vision.embeddings.patch_embedding.weight.numel()
    assert task.flops(batch) == counted(_task_step(task, batch)) - loss_matmul + 2 * 2 * stem
