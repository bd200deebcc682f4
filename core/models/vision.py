"""Vision towers: ViT, SigLIP, SigLIP2 and CLIP, computing what `transformers` computes.

Module names are the tensor names of Hugging Face checkpoints, so loading one is `load_state_dict`
after stripping wrapper prefixes:
  ViT      ViTModel's classic names (`encoder.layer.N.attention.attention.query`): every ViT
           checkpoint is stored under them (transformers 5 renames them in memory only).
  SigLIP   SiglipVisionModel as transformers 5 saves it (`encoder.layers.N.self_attn.q_proj`). Older
           and full SiglipModel checkpoints prefix it with `vision_model.`, which is stripped. The
           fixed-resolution SigLIP2 checkpoints (google/siglip2-base-patch16-224) are of this kind.
  SigLIP2  Siglip2VisionModel (NaFlex: linear patch embedding, positions resized to each image's
           patch grid), for batches of same-size unpadded images.
  CLIP     CLIPVisionModel as transformers 5 saves it (SigLIP's block names, plus `pre_layrnorm`
           and `embeddings.class_embedding`). Older, full CLIPModel (LLaVA's
           openai/clip-vit-large-patch14-336) and CLIPVisionModelWithProjection checkpoints hold
           it under `vision_model.`; their projection and text tower are not part of it.

Every tower: model(pixel_values [B, C, H, W]) -> transformers' last_hidden_state [B, N, D]
([B, 1+N, D], CLS first, for ViT and CLIP): after the final LayerNorm for ViT and SigLIP; CLIP's
post_layernorm applies to the pooled CLS token only. model.pool(hidden) -> [B, D] (pooler_output).
model.hidden_state(pixel_values, layer) -> transformers' hidden_states[layer] (LLaVA's
vision_feature_layer). `model.blocks` holds self-contained blocks called as block(x), so engines
can wrap each one (FSDP, checkpointing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .. import lazy_tensors
from .attention import attention
from .registry import register

HALF = (0.5, 0.5, 0.5)  # normalisation to [-1, 1]: SigLIP's, and google/vit-base-patch16-224's
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's (CLIPImageProcessor defaults)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation (transformers' QuickGELUActivation)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact erf GELU (ViT)
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),  # SigLIP
    "quick_gelu": quick_gelu,  # CLIP
    "tanh": torch.tanh,  # ViT pooler
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ---------------------------------------------------------------------------------- configs
def _square(value: int | list[int], name: str) -> int:
    """transformers accepts (height, width) sizes; our position tables are square grids."""
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ValueError(f"{name}={list(value)} is not supported: only square sizes are")


def _check_common(args) -> None:
    args.patch_size = _square(args.patch_size, "patch_size")
    if args.hidden_size % args.num_attention_heads:
        raise ValueError(
            f"hidden_size={args.hidden_size} is not divisible by "
            f"num_attention_heads={args.num_attention_heads}"
        )
    activation(args.hidden_act)
    args.image_mean, args.image_std = tuple(args.image_mean), tuple(args.image_std)


def _args_from(args_cls: type, cfg: dict):
    """The fields of `args_cls` found in an HF config dict; absent ones take transformers' defaults
    (older config.json files omit keys that were added later, e.g. ViT's qkv_bias)."""
    names = {f.name for f in fields(args_cls)}
    return args_cls(**{k: v for k, v in cfg.items() if k in names})


@dataclass
class ViTArgs:
    """ViTConfig's fields and defaults (google/vit-base-patch16-224) plus image normalisation."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None  # None: hidden_size
    pooler_act: str = "tanh"
    image_mean: tuple[float, ...] = HALF
    image_std: tuple[float, ...] = HALF

    def __post_init__(self):
        _check_common(self)
        self.image_size = _square(self.image_size, "image_size")
        self.pooler_output_size = self.pooler_output_size or self.hidden_size
        activation(self.pooler_act)


@dataclass
class SiglipArgs:
    """SiglipVisionConfig's fields and defaults (google/siglip-base-patch16-224)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True
    image_mean: tuple[float, ...] = HALF
    image_std: tuple[float, ...] = HALF

    def __post_init__(self):
        _check_common(self)
        self.image_size = _square(self.image_size, "image_size")


@dataclass
class Siglip2Args:
    """Siglip2VisionConfig's fields and defaults: a position table of `num_patches` (a square grid)
    instead of an image size."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    num_patches: int = 256
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True
    image_mean: tuple[float, ...] = HALF
    image_std: tuple[float, ...] = HALF

    def __post_init__(self):
        _check_common(self)
        if math.isqrt(self.num_patches) ** 2 != self.num_patches:
            raise ValueError(f"num_patches={self.num_patches} is not supported: not a square grid")

    @property
    def image_size(self) -> int:
        """The position table's native resolution."""
        return math.isqrt(self.num_patches) * self.patch_size


@dataclass
class CLIPArgs:
    """CLIPVisionConfig's fields and defaults (openai/clip-vit-base-patch32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512  # CLIPVisionModelWithProjection's; unused, kept in the config
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self):
        _check_common(self)
        self.image_size = _square(self.image_size, "image_size")


# ---------------------------------------------------------------------------------- shared pieces
def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H*Dh] -> [B, H, T, Dh]"""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, Dh] -> [B, T, H*Dh]"""
    return x.transpose(1, 2).flatten(2)


def resample_grid(table: torch.Tensor, grid: tuple[int, int], **interpolate) -> torch.Tensor:
    """Position table [S*S, D] of a square S x S grid, resampled to `grid` (h, w) -> [h*w, D]."""
    side = math.isqrt(table.shape[0])
    image = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=grid, align_corners=False, **interpolate)
    return image.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)


def self_attention(
    x: torch.Tensor,
    q_proj: nn.Linear,
    k_proj: nn.Linear,
    v_proj: nn.Linear,
    num_heads: int,
    p: float,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional multi-head self-attention before the output projection; dropout p on the
    attention weights; `key_padding` [B, T] (1 = a real token) hides padded keys."""
    q, k, v = (split_heads(proj(x), num_heads) for proj in (q_proj, k_proj, v_proj))
    return merge_heads(attention(q, k, v, "bidirectional", key_padding=key_padding, dropout_p=p))


class VisionTower(nn.Module):
    """The checkpoint protocol of core.models and the attributes engines and tasks read:
    hidden_size, num_heads, image_size, patch_size, num_tokens, image_mean/std, has_cls_token,
    has_head, blocks."""

    MODEL_TYPES: tuple[str, ...]
    ARCHITECTURE: str  # the transformers class our checkpoints load into
    ARGS: type  # the dataclass of config fields
    has_cls_token = False
    has_head = False  # a SigLIP attention-pooling (MAP) head

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.hidden_size: int = args.hidden_size
        self.patch_size: int = args.patch_size
        self.image_mean: tuple[float, ...] = args.image_mean
        self.image_std: tuple[float, ...] = args.image_std

    @property
    def num_heads(self) -> int:
        return self.args.num_attention_heads

    @property
    def num_tokens(self) -> int:
        """Tokens the encoder sees per image: the patches (+ [CLS])."""
        return (self.image_size // self.patch_size) ** 2 + int(self.has_cls_token)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> VisionTower:
        return cls(_args_from(cls.ARGS, cfg))

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The first block's input [B, N, D]."""
        return self.embeddings(pixel_values)

    def hidden_state(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        """transformers' `hidden_states[layer]` (output_hidden_states=True): 0 the first block's
        input, k the output of block k, negative counting from the end (-1 the last block's, -2
        the penultimate, LLaVA's vision_feature_layer); no final LayerNorm. Runs only the blocks
        up to `layer`."""
        n = len(self.blocks)
        index = layer + n + 1 if layer < 0 else layer
        if not 0 <= index <= n:
            raise ValueError(f"layer {layer} is out of range for {n} blocks: -{n + 1}..{n}")
        x = self.embed(pixel_values)
        for block in self.blocks[:index]:
            x = block(x)
        return x

    def hf_config(self) -> dict:
        return {
            "model_type": self.MODEL_TYPES[0],
            "architectures": [self.ARCHITECTURE],
            **asdict(self.args),
        }

    def set_image_size(self, image_size: int) -> None:
        """Resample the position table to `image_size` for good (e.g. fine-tuning at a new
        resolution): later forwards and saved checkpoints use the new size natively. For towers
        whose embeddings have a `position_embedding` table and `positions(grid)` (SigLIP, CLIP);
        ViT and SigLIP 2 override it."""
        lazy_tensors.materialize(self.embeddings)  # a stand-in's value is read first (fsdp)
        side = image_size // self.patch_size
        with torch.no_grad():
            table = self.embeddings.positions((side, side)).detach().clone()
        self.embeddings.position_embedding = nn.Embedding.from_pretrained(table, freeze=False)
        self.args.image_size = self.image_size = image_size

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{type(self).__name__}: checkpoint does not match the model config; "
                f"missing {missing}, unexpected {unexpected}"
            )
        # No non-persistent buffers and no tied weights: every tensor comes from the checkpoint.
        self.load_state_dict(state, assign=True)


# ---------------------------------------------------------------------------------- ViT
class Dense(nn.Module):
    """A Linear stored as `<name>.dense`: the nesting of ViT checkpoints' tensor names."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, args: ViTArgs):
        super().__init__()
        p = args.patch_size
        self.projection = nn.Conv2d(args.num_channels, args.hidden_size, kernel_size=p, stride=p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values)


class ViTEmbeddings(nn.Module):
    def __init__(self, args: ViTArgs):
        super().__init__()
        num_patches = (args.image_size // args.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.empty(1, 1, args.hidden_size))
        self.position_embeddings = nn.Parameter(torch.empty(1, 1 + num_patches, args.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(args)
        self.dropout = nn.Dropout(args.hidden_dropout_prob)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """[1, 1+h*w, D]; the patch part resampled bicubically when the grid differs from the
        checkpoint's (transformers' interpolate_pos_encoding=True), the CLS position kept."""
        table = self.position_embeddings[0]
        side = math.isqrt(table.shape[0] - 1)
        if grid == (side, side):
            return self.position_embeddings
        patches = resample_grid(table[1:], grid, mode="bicubic")
        return torch.cat([table[:1], patches])[None]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embeddings.projection.weight
        patches = self.patch_embeddings(pixel_values.to(weight.dtype))  # [B, D, h, w]
        grid = tuple(patches.shape[-2:])
        x = patches.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.positions(grid))


class ViTSelfAttention(nn.Module):
    def __init__(self, args: ViTArgs):
        super().__init__()
        d, bias = args.hidden_size, args.qkv_bias
        self.num_heads = args.num_attention_heads
        self.dropout_p = args.attention_probs_dropout_prob
        self.query = nn.Linear(d, d, bias=bias)
        self.key = nn.Linear(d, d, bias=bias)
        self.value = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout_p = self.dropout_p if self.training else 0.0
        return self_attention(x, self.query, self.key, self.value, self.num_heads, dropout_p)


class ViTAttention(nn.Module):
    def __init__(self, args: ViTArgs):
        super().__init__()
        self.attention = ViTSelfAttention(args)
        self.output = Dense(args.hidden_size, args.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class ViTLayer(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, args: ViTArgs):
        super().__init__()
        d, eps = args.hidden_size, args.layer_norm_eps
        self.layernorm_before = nn.LayerNorm(d, eps=eps)
        self.attention = ViTAttention(args)
        self.layernorm_after = nn.LayerNorm(d, eps=eps)
        self.intermediate = Dense(d, args.intermediate_size)
        self.output = Dense(args.intermediate_size, d)
        self.act = activation(args.hidden_act)
        self.dropout = nn.Dropout(args.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.layernorm_before(x)))
        h = self.output(self.act(self.intermediate(self.layernorm_after(x))))
        return x + self.dropout(h)


class ViTEncoder(nn.Module):
    def __init__(self, args: ViTArgs):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(args) for _ in range(args.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x)
        return x


class ViTPooler(nn.Module):
    """ViTModel's pooler_output: act(dense(CLS))."""

    def __init__(self, args: ViTArgs):
        super().__init__()
        self.dense = nn.Linear(args.hidden_size, args.pooler_output_size)
        self.act = activation(args.pooler_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden[:, 0]))


@register
class ViT(VisionTower):
    """ViTModel: [CLS] + patch tokens, pre-norm encoder, final LayerNorm, optional pooler."""

    MODEL_TYPES = ("vit",)
    ARCHITECTURE = "ViTModel"
    ARGS = ViTArgs
    has_cls_token = True

    def __init__(self, args: ViTArgs, pooler: bool = True):
        super().__init__(args)
        self.image_size: int = args.image_size
        self.embeddings = ViTEmbeddings(args)
        self.encoder = ViTEncoder(args)
        self.layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.pooler = ViTPooler(args) if pooler else None

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layer

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ViT:
        # transformers builds ViTModel with a pooler, its task models (ViTForImageClassification,
        # google/vit-base-patch16-224) without one.
        architectures = cfg.get("architectures") or ["ViTModel"]
        return cls(_args_from(ViTArgs, cfg), pooler=architectures == ["ViTModel"])

    @staticmethod
    def hf_state_dict_from(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
        # Task models hold the tower as `vit.`; their heads are not part of it.
        heads = ("classifier.", "decoder.", "embeddings.mask_token")
        stripped = {k.removeprefix("vit."): v for k, v in state.items()}
        return {k: v for k, v in stripped.items() if not k.startswith(heads)}

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        # The pooler is optional in ViTModel checkpoints (add_pooling_layer) and config.json does
        # not record it: follow the tensors.
        has_pooler = any(k.startswith("pooler.") for k in state)
        if has_pooler != (self.pooler is not None):
            with torch.device("meta"):
                self.pooler = ViTPooler(self.args) if has_pooler else None
        super().load_hf_state_dict(state)

    def set_image_size(self, image_size: int) -> None:
        """Resample the position table to `image_size` for good (e.g. fine-tuning at a new
        resolution): later forwards and saved checkpoints use the new size natively."""
        lazy_tensors.materialize(self.embeddings)  # a stand-in's value is read first (fsdp)
        side = image_size // self.patch_size
        with torch.no_grad():
            table = self.embeddings.positions((side, side)).detach().clone()
        self.embeddings.position_embeddings = nn.Parameter(table)
        self.args.image_size = self.image_size = image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1 + (H/p)*(W/p), D], CLS first."""
        return self.layernorm(self.encoder(self.embeddings(pixel_values)))

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """ViTModel's pooler_output [B, pooler_output_size]."""
        if self.pooler is None:
            raise ValueError("this ViT checkpoint has no pooler (add_pooling_layer=False)")
        return self.pooler(hidden)


# ---------------------------------------------------------------------------------- SigLIP
class SiglipEmbeddings(nn.Module):
    def __init__(self, args: SiglipArgs):
        super().__init__()
        p, d = args.patch_size, args.hidden_size
        self.patch_embedding = nn.Conv2d(args.num_channels, d, kernel_size=p, stride=p)
        self.position_embedding = nn.Embedding((args.image_size // p) ** 2, d)
        nn.init.normal_(self.position_embedding.weight, std=d**-0.5)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """[h*w, D], resampled bicubically when the grid differs from the checkpoint's
        (transformers' interpolate_pos_encoding=True)."""
        table = self.position_embedding.weight
        side = math.isqrt(table.shape[0])
        return table if grid == (side, side) else resample_grid(table, grid, mode="bicubic")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # [B, D, h, w]
        grid = tuple(patches.shape[-2:])
        return patches.flatten(2).transpose(1, 2) + self.positions(grid)


class Siglip2Embeddings(nn.Module):
    def __init__(self, args: Siglip2Args):
        super().__init__()
        self.patch_size = p = args.patch_size
        self.patch_embedding = nn.Linear(args.num_channels * p * p, args.hidden_size)
        self.position_embedding = nn.Embedding(args.num_patches, args.hidden_size)
        nn.init.normal_(self.position_embedding.weight, std=args.hidden_size**-0.5)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """[h*w, D]: NaFlex always resamples the table to the image's grid, bilinear with
        antialiasing, in float32 (transformers does on CPU: no antialias kernel for bf16 there)."""
        table = self.position_embedding.weight
        resized = resample_grid(table.float(), grid, mode="bilinear", antialias=True)
        return resized.to(table.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, C, H, W = pixel_values.shape
        p = self.patch_size
        h, w = H // p, W // p
        # Flatten each patch in (row, column, channel) order, as Siglip2ImageProcessor does.
        patches = pixel_values[:, :, : h * p, : w * p].reshape(B, C, h, p, w, p)
        patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        return x + self.positions((h, w))


class SiglipAttention(nn.Module):
    def __init__(self, args: SiglipArgs | Siglip2Args | CLIPArgs):
        super().__init__()
        d = args.hidden_size
        self.num_heads = args.num_attention_heads
        self.dropout_p = args.attention_dropout
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        dropout_p = self.dropout_p if self.training else 0.0
        h = self_attention(
            x, self.q_proj, self.k_proj, self.v_proj, self.num_heads, dropout_p, key_padding
        )
        return self.out_proj(h)


class SiglipMLP(nn.Module):
    def __init__(self, args: SiglipArgs | Siglip2Args | CLIPArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.hidden_size)
        self.act = activation(args.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + MLP(LN(x)). CLIP's and SigLIP text's too."""

    def __init__(self, args: SiglipArgs | Siglip2Args | CLIPArgs):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attn = SiglipAttention(args)
        self.layer_norm2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = SiglipMLP(args)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_padding)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, args: SiglipArgs | Siglip2Args | CLIPArgs):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(args) for _ in range(args.num_hidden_layers))

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.layers:
            x = block(x, key_padding)
        return x


class ProbeAttention(nn.Module):
    """Cross-attention from probe queries to the tokens, with torch.nn.MultiheadAttention's tensor
    layout (packed in_proj, out_proj) that SigLIP checkpoints store, computed by `attention`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = split_heads(F.linear(queries, w_q, b_q), self.num_heads)
        k = split_heads(F.linear(tokens, w_k, b_k), self.num_heads)
        v = split_heads(F.linear(tokens, w_v, b_v), self.num_heads)
        return self.out_proj(merge_heads(attention(q, k, v, "bidirectional")))


class SiglipPoolingHead(nn.Module):
    """Multihead attention pooling (MAP): a learned probe attends to the tokens, then a residual
    MLP; SigLIP's image embedding."""

    def __init__(self, args: SiglipArgs | Siglip2Args):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, args.hidden_size))
        self.attention = ProbeAttention(args.hidden_size, args.num_attention_heads)
        self.layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = SiglipMLP(args)
        nn.init.xavier_uniform_(self.probe)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.probe.expand(hidden.shape[0], -1, -1), hidden)
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


@register
class SiglipVision(VisionTower):
    """SiglipVisionModel: patch tokens (no CLS), pre-norm encoder, post LayerNorm, optional MAP
    head. Also loads the vision tower of a full SiglipModel checkpoint (model_type `siglip`)."""

    MODEL_TYPES = ("siglip_vision_model", "siglip")
    FULL_MODEL_TYPES = ("siglip", "siglip2")  # text + vision checkpoints: the tower is a sub-model
    ARCHITECTURE = "SiglipVisionModel"
    ARGS = SiglipArgs
    EMBEDDINGS = SiglipEmbeddings

    def __init__(self, args: SiglipArgs | Siglip2Args):
        super().__init__(args)
        self.image_size: int = args.image_size
        self.embeddings = self.EMBEDDINGS(args)
        self.encoder = SiglipEncoder(args)
        self.post_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.head = SiglipPoolingHead(args) if args.vision_use_head else None

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def has_head(self) -> bool:
        return self.head is not None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> SiglipVision:
        if cfg["model_type"] in cls.FULL_MODEL_TYPES:
            cfg = cfg.get("vision_config") or {}  # hub configs may list only non-default keys
        return cls(_args_from(cls.ARGS, cfg))

    @classmethod
    def hf_state_dict_from(
        cls, state: dict[str, torch.Tensor], cfg: dict
    ) -> dict[str, torch.Tensor]:
        # Full models keep the tower under `vision_model.` next to the text tower and logit
        # scale/bias; older vision-only checkpoints use the same prefix.
        full = cfg["model_type"] in cls.FULL_MODEL_TYPES
        prefix = "vision_model."
        return {
            k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix) or not full
        }

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)*(W/p), D]"""
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MAP head's pooled output [B, D] (transformers' pooler_output)."""
        if self.head is None:
            raise ValueError("this SigLIP tower has no attention-pooling head (vision_use_head)")
        return self.head(hidden)


@register
class Siglip2Vision(SiglipVision):
    """Siglip2VisionModel (NaFlex) on batches of same-size images without padding: the position
    table is resampled to each batch's patch grid, so any image size works."""

    MODEL_TYPES = ("siglip2_vision_model", "siglip2")
    ARCHITECTURE = "Siglip2VisionModel"
    ARGS = Siglip2Args
    EMBEDDINGS = Siglip2Embeddings

    def set_image_size(self, image_size: int) -> None:
        """The size to preprocess images to; positions are resampled in every forward anyway."""
        self.image_size = image_size


# ---------------------------------------------------------------------------------- CLIP
class CLIPEmbeddings(nn.Module):
    def __init__(self, args: CLIPArgs):
        super().__init__()
        p, d = args.patch_size, args.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.patch_embedding = nn.Conv2d(args.num_channels, d, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(1 + (args.image_size // p) ** 2, d)
        nn.init.normal_(self.class_embedding, std=d**-0.5)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """[1+h*w, D]; the patch part resampled bicubically when the grid differs from the
        checkpoint's (transformers' interpolate_pos_encoding=True), the CLS position kept."""
        table = self.position_embedding.weight
        side = math.isqrt(table.shape[0] - 1)
        if grid == (side, side):
            return table
        return torch.cat([table[:1], resample_grid(table[1:], grid, mode="bicubic")])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # [B, D, h, w]
        grid = tuple(patches.shape[-2:])
        x = patches.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.positions(grid)


@register
class CLIPVision(VisionTower):
    """CLIPVisionModel: [CLS] + patch tokens, a LayerNorm before the encoder (`pre_layrnorm`, as
    transformers spells it), pre-norm blocks, and `post_layernorm` on the CLS token only (the
    pooled output). Also loads the vision tower of a full CLIPModel (model_type `clip`)."""

    MODEL_TYPES = ("clip_vision_model", "clip")
    ARCHITECTURE = "CLIPVisionModel"
    ARGS = CLIPArgs
    has_cls_token = True

    def __init__(self, args: CLIPArgs):
        super().__init__(args)
        self.image_size: int = args.image_size
        self.embeddings = CLIPEmbeddings(args)
        self.pre_layrnorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.encoder = SiglipEncoder(args)  # the same block, under the same tensor names
        self.post_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layers

    @classmethod
    def from_hf_config(cls, cfg: dict) -> CLIPVision:
        if cfg["model_type"] == "clip":
            cfg = cfg.get("vision_config") or {}  # hub configs may list only non-default keys
        return cls(_args_from(CLIPArgs, cfg))

    @staticmethod
    def hf_state_dict_from(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
        # Wrapped layouts (CLIPModel, CLIPVisionModelWithProjection, transformers 4's
        # CLIPVisionModel) hold the tower under `vision_model.`, beside what is not part of it
        # (text_model.*, visual_projection, logit_scale). Old checkpoints also stored the
        # position_ids buffer, rebuilt here from the table's size.
        prefix = "vision_model."
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        return {k: v for k, v in state.items() if not k.endswith("position_ids")}

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pre_layrnorm(self.embeddings(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1 + (H/p)*(W/p), D], CLS first; no final LayerNorm (CLIP's
        last_hidden_state)."""
        return self.encoder(self.embed(pixel_values))

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """post_layernorm(CLS) [B, D]: CLIPVisionModel's pooler_output."""
        return self.post_layernorm(hidden[:, 0])
