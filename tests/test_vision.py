"""Our vision towers against `transformers`: tiny random checkpoints saved by transformers, loaded
through core.models, compared in fp32 (hidden states, pooled outputs, resized positions), and saved
back for transformers to load."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

from core import models
from core.models.vision import Siglip2Vision, SiglipVision, ViT

TOL = 1e-5
PATCH = 8
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=PATCH,
)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every tensor: transformers initialises LayerNorms to ones/zeros and biases to
    zeros, which would hide swapped or dropped norms and biases."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _save(model: torch.nn.Module, path) -> str:
    _randomize(model).save_pretrained(path)
    return str(path)


def _pixels(height: int, width: int | None = None, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(height * 1000 + (width or height))
    return torch.randn(batch, 3, height, width or height, generator=gen)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _siglip2_inputs(pixels: torch.Tensor) -> dict:
    """NaFlex inputs for same-size images without padding, patchified by transformers' processor."""
    b, _, h, w = pixels.shape
    patches = [torch.from_numpy(convert_image_to_patches(x.numpy(), PATCH)) for x in pixels]
    grid = (h // PATCH, w // PATCH)
    return dict(
        pixel_values=torch.stack(patches),
        pixel_attention_mask=torch.ones(b, grid[0] * grid[1], dtype=torch.long),
        spatial_shapes=torch.tensor([grid] * b),
    )


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    cfg = ViTConfig(**TINY, image_size=32, hidden_dropout_prob=0.1)  # dropout: off in eval
    return _save(ViTModel(cfg), tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    cfg = SiglipVisionConfig(**TINY, image_size=32)
    return _save(SiglipVisionModel(cfg), tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    cfg = Siglip2VisionConfig(**TINY, num_patches=16)
    return _save(Siglip2VisionModel(cfg), tmp_path_factory.mktemp("siglip2"))


# ---------------------------------------------------------------------------------- ViT
def test_vit_matches_transformers(vit_dir):
    ours, ref = models.from_pretrained(vit_dir), ViTModel.from_pretrained(vit_dir).eval()
    assert isinstance(ours, ViT)
    assert (ours.hidden_size, ours.image_size, ours.patch_size) == (32, 32, PATCH)
    assert ours.image_mean == ours.image_std == (0.5, 0.5, 0.5)
    assert isinstance(ours.blocks, torch.nn.ModuleList) and len(ours.blocks) == 2
    x = _pixels(32)
    with torch.no_grad():
        hidden, expected = ours(x), ref(x)
        assert hidden.shape == (2, 1 + 16, 32)
        assert _maxdiff(hidden, expected.last_hidden_state) <= TOL
        assert _maxdiff(ours.pool(hidden), expected.pooler_output) <= TOL


@pytest.mark.parametrize("size", [(16, 16), (48, 48), (40, 56)])
def test_vit_interpolated_positions_match_transformers(vit_dir, size):
    ours, ref = models.from_pretrained(vit_dir), ViTModel.from_pretrained(vit_dir).eval()
    x = _pixels(*size)
    with torch.no_grad():
        expected = ref(x, interpolate_pos_encoding=True).last_hidden_state
        assert _maxdiff(ours(x), expected) <= TOL


def test_vit_save_pretrained_loads_in_transformers(vit_dir, tmp_path):
    ours = models.from_pretrained(vit_dir)
    models.save_pretrained(ours, tmp_path)
    ref, info = ViTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = _pixels(32)
    with torch.no_grad():
        expected = ref.eval()(x)
        assert _maxdiff(ours(x), expected.last_hidden_state) <= TOL
        assert _maxdiff(ours.pool(ours(x)), expected.pooler_output) <= TOL


def test_vit_classification_checkpoint_loads_its_tower(tmp_path):
    # The layout of google/vit-base-patch16-224: the tower under `vit.`, no pooler, a classifier.
    path = _save(
        ViTForImageClassification(ViTConfig(**TINY, image_size=32, num_labels=3)), tmp_path
    )
    ours, ref = models.from_pretrained(path), ViTForImageClassification.from_pretrained(path)
    x = _pixels(32)
    with torch.no_grad():
        assert _maxdiff(ours(x), ref.eval().vit(x).last_hidden_state) <= TOL
    assert ours.pooler is None
    with pytest.raises(ValueError, match="no pooler"):
        ours.pool(ours(x))


# ---------------------------------------------------------------------------------- SigLIP
def test_siglip_matches_transformers(siglip_dir):
    ours, ref = models.from_pretrained(siglip_dir), SiglipVisionModel.from_pretrained(siglip_dir)
    assert isinstance(ours, SiglipVision) and ours.has_head and not ours.has_cls_token
    assert (ours.hidden_size, ours.image_size, ours.patch_size) == (32, 32, PATCH)
    assert len(ours.blocks) == 2
    x = _pixels(32)
    with torch.no_grad():
        hidden, expected = ours(x), ref.eval()(x)
        assert hidden.shape == (2, 16, 32)
        assert _maxdiff(hidden, expected.last_hidden_state) <= TOL
        assert _maxdiff(ours.pool(hidden), expected.pooler_output) <= TOL


@pytest.mark.parametrize("size", [(16, 16), (48, 48), (40, 56)])
def test_siglip_interpolated_positions_match_transformers(siglip_dir, size):
    ours, ref = models.from_pretrained(siglip_dir), SiglipVisionModel.from_pretrained(siglip_dir)
    x = _pixels(*size)
    with torch.no_grad():
        expected = ref.eval()(x, interpolate_pos_encoding=True)
        hidden = ours(x)
        assert _maxdiff(hidden, expected.last_hidden_state) <= TOL
        assert _maxdiff(ours.pool(hidden), expected.pooler_output) <= TOL


def test_siglip_save_pretrained_loads_in_transformers(siglip_dir, tmp_path):
    ours = models.from_pretrained(siglip_dir)
    models.save_pretrained(ours, tmp_path)
    ref, info = SiglipVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = _pixels(32)
    with torch.no_grad():
        expected = ref.eval()(x)
        assert _maxdiff(ours(x), expected.last_hidden_state) <= TOL
        assert _maxdiff(ours.pool(ours(x)), expected.pooler_output) <= TOL


def test_full_siglip_checkpoint_loads_vision_tower(tmp_path):
    text = dict(TINY, vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = SiglipConfig(vision_config=dict(TINY, image_size=32), text_config=text)
    path = _save(SiglipModel(cfg), tmp_path)
    ours, ref = models.from_pretrained(path), SiglipModel.from_pretrained(path).eval()
    assert isinstance(ours, SiglipVision)
    x = _pixels(32)
    with torch.no_grad():
        hidden, expected = ours(x), ref.vision_model(x)
        assert _maxdiff(hidden, expected.last_hidden_state) <= TOL
        assert _maxdiff(ours.pool(hidden), expected.pooler_output) <= TOL


def test_prefixed_headless_siglip_checkpoint(tmp_path):
    # transformers 4 saved SiglipVisionModel under `vision_model.`; PaliGemma's tower has no head.
    path = _save(SiglipVisionModel(SiglipVisionConfig(**TINY, vision_use_head=False)), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    prefixed = {f"vision_model.{k}": v for k, v in state.items()}
    save_file(prefixed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, ref = models.from_pretrained(path), SiglipVisionModel.from_pretrained(path).eval()
    assert not ours.has_head
    x = _pixels(16)
    with torch.no_grad():
        expected = ref(x, interpolate_pos_encoding=True).last_hidden_state
        assert _maxdiff(ours(x), expected) <= TOL
    with pytest.raises(ValueError, match="no attention-pooling head"):
        ours.pool(ours(x))


@pytest.mark.parametrize(
    "family_dir, reference", [("vit_dir", ViTModel), ("siglip_dir", SiglipVisionModel)]
)
def test_set_image_size_resamples_positions_for_good(family_dir, reference, request, tmp_path):
    path = request.getfixturevalue(family_dir)
    ours, ref = models.from_pretrained(path), reference.from_pretrained(path).eval()
    ours.set_image_size(48)
    assert ours.image_size == 48
    models.save_pretrained(ours, tmp_path)
    native = reference.from_pretrained(tmp_path).eval()  # a 48-px model: no interpolation needed
    x = _pixels(48)
    with torch.no_grad():
        expected = ref(x, interpolate_pos_encoding=True).last_hidden_state
        assert _maxdiff(ours(x), expected) <= TOL
        assert _maxdiff(native(x).last_hidden_state, expected) <= TOL


# ---------------------------------------------------------------------------------- SigLIP2
@pytest.mark.parametrize("size", [(32, 32), (48, 24), (24, 40)])
def test_siglip2_matches_transformers(siglip2_dir, size):
    ours, ref = models.from_pretrained(siglip2_dir), Siglip2VisionModel.from_pretrained(siglip2_dir)
    assert isinstance(ours, Siglip2Vision) and ours.image_size == 32
    x = _pixels(*size)
    with torch.no_grad():
        hidden, expected = ours(x), ref.eval()(**_siglip2_inputs(x))
        assert _maxdiff(hidden, expected.last_hidden_state) <= TOL
        assert _maxdiff(ours.pool(hidden), expected.pooler_output) <= TOL


def test_siglip2_save_pretrained_loads_in_transformers(siglip2_dir, tmp_path):
    ours = models.from_pretrained(siglip2_dir)
    models.save_pretrained(ours, tmp_path)
    ref, info = Siglip2VisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = _pixels(40, 24)
    with torch.no_grad():
        expected = ref.eval()(**_siglip2_inputs(x)).last_hidden_state
        assert _maxdiff(ours(x), expected) <= TOL


# ---------------------------------------------------------------------------------- configs
# config.json of hub checkpoints, written by older transformers (minus label maps).
VIT_BASE_224 = {
    "architectures": ["ViTForImageClassification"],
    "attention_probs_dropout_prob": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 768,
    "image_size": 224,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "model_type": "vit",
    "num_attention_heads": 12,
    "num_channels": 3,
    "num_hidden_layers": 12,
    "patch_size": 16,
    "qkv_bias": True,
    "transformers_version": "4.13.0.dev0",
}
SIGLIP_SO400M_384 = {
    "architectures": ["SiglipModel"],
    "initializer_factor": 1.0,
    "model_type": "siglip",
    "text_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "model_type": "siglip_text_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
    },
    "torch_dtype": "float32",
    "transformers_version": "4.37.0.dev0",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
}
SIGLIP2_BASE_224 = {  # fixed-resolution SigLIP2 is a `siglip` checkpoint
    "initializer_factor": 1.0,
    "model_type": "siglip",
    "text_config": {"model_type": "siglip_text_model", "vocab_size": 256000},
    "transformers_version": "4.49.0.dev0",
    "vision_config": {"model_type": "siglip_vision_model"},
}


@pytest.mark.parametrize(
    "cfg, cls, hf_vision_config, expected",
    [
        (VIT_BASE_224, ViT, lambda c: ViTConfig(**c), (768, 224, 16, 12, 196 + 1)),
        (
            SIGLIP_SO400M_384,
            SiglipVision,
            lambda c: SiglipConfig(**c).vision_config,
            (1152, 384, 14, 27, 729),
        ),
        (
            SIGLIP2_BASE_224,
            SiglipVision,
            lambda c: SiglipConfig(**c).vision_config,
            (768, 224, 16, 12, 196),
        ),
    ],
    ids=["vit-base-patch16-224", "siglip-so400m-patch14-384", "siglip2-base-patch16-224"],
)
def test_hub_configs_build_with_transformers_defaults(cfg, cls, hf_vision_config, expected):
    with torch.device("meta"):  # full size, no memory
        model = models.from_config(cfg)
    assert type(model) is cls
    embeddings = model.embeddings
    table = getattr(embeddings, "position_embeddings", None)
    table = table[0] if table is not None else embeddings.position_embedding.weight
    got = (model.hidden_size, model.image_size, model.patch_size, len(model.blocks), len(table))
    assert got == expected
    # Every field we read has the value transformers gives it from the same config.json.
    hf = hf_vision_config({k: v for k, v in cfg.items() if k != "model_type"})
    ours = model.hf_config()
    for key, value in ours.items():
        if key not in ("model_type", "architectures", "image_mean", "image_std"):
            assert getattr(hf, key) == value, key


def test_siglip2_naflex_config_defaults():
    with torch.device("meta"):
        model = models.from_config({"model_type": "siglip2", "vision_config": {}})
    assert type(model) is Siglip2Vision
    assert (model.hidden_size, model.image_size, model.patch_size) == (768, 256, 16)
    assert model.hf_config()["num_patches"] == Siglip2VisionConfig().num_patches


def test_unsupported_options_raise_clear_errors(siglip_dir, tmp_path):
    with pytest.raises(ValueError, match=r"image_size=\[32, 48\] is not supported"):
        models.from_config({"model_type": "vit", **TINY, "image_size": [32, 48]})
    with pytest.raises(ValueError, match="unsupported activation 'mish'"):
        models.from_config({"model_type": "siglip_vision_model", **TINY, "hidden_act": "mish"})
    with pytest.raises(ValueError, match="not divisible"):
        models.from_config({"model_type": "siglip_vision_model", **TINY, "num_attention_heads": 5})
    # A checkpoint that does not match its config names the tensors.
    models.save_pretrained(models.from_pretrained(siglip_dir), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["post_layernorm.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['post_layernorm.weight'\]"):
        models.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_type", ["vit", "siglip_vision_model", "siglip2_vision_model"])
def test_blocks_are_self_contained(model_type):
    # Engines wrap model.blocks[i] from outside; running the pieces by hand must give forward().
    cfg = {"model_type": model_type, **TINY, "image_size": 32, "num_patches": 16}
    torch.manual_seed(0)
    model = models.from_config(cfg).eval()
    final_norm = model.layernorm if model_type == "vit" else model.post_layernorm
    x = _pixels(32)
    with torch.no_grad():
        h = model.embeddings(x)
        for block in model.blocks:
            h = block(h)
        assert torch.equal(final_norm(h), model(x))
