"""Model FLOPs (core/flops.py) against torch's own count of the matmuls and attention that a
forward and backward really run (torch.utils.flop_counter), on tiny towers."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from core import models
from core.flops import TowerCost, segment_square_sum

DECODER = {
    "model_type": "qwen2", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "tie_word_embeddings": False,
}  # fmt: skip


def counted(fn) -> int:
    """FLOPs torch counts for `fn`. SDPA's math path: the fused CPU kernel has no FLOP formula
    in torch's counter (it would count attention as 0)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def decoder_cost(model, grad_upstream=False) -> TowerCost:
    return TowerCost.of(model, layers=2, attn_dim=4 * 8, grad_upstream=grad_upstream,
                        exclude=(model.lm_head,))  # fmt: skip


@pytest.mark.parametrize("mode", ["trained", "frozen", "frozen_under_trained", "half"])
def test_decoder_training_flops_match_torch_count(mode):
    torch.manual_seed(0)
    model = models.from_config(DECODER)
    T = 12
    ids = torch.randint(0, 50, (1, T))
    if mode != "trained":
        model.requires_grad_(False)
    if mode == "half":
        model.layers[1].requires_grad_(True)
    embeds = model.embed(ids).detach().requires_grad_(mode == "frozen_under_trained")

    def step():
        hidden = model(inputs_embeds=embeds, mask_kind="causal", return_hidden=True)
        if hidden.requires_grad:
            hidden.sum().backward()

    expected = decoder_cost(model, grad_upstream=mode == "frozen_under_trained").flops(T, T * T)
    per_layer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * 32 * 48  # q, k+v (2 kv heads), o, mlp
    if mode == "half":  # the documented overcount: autograd skips layer 0's input gradients
        expected -= 2 * per_layer * T + 8 * 32 * T * T
    assert counted(step) == expected
    # by hand for the fully trained tower: 6 P per token + 12 L A T per token
    if mode == "trained":
        assert expected == 6 * 2 * per_layer * T + 12 * 2 * 32 * T * T


def test_vision_tower_forward_only_when_frozen():
    torch.manual_seed(0)
    tower = models.from_config({
        "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
        "vision_use_head": False,
    }).requires_grad_(False)  # fmt: skip
    pixels = torch.randn(3, 3, 32, 32)
    n = tower.num_tokens
    cost = TowerCost.of(tower, layers=2, attn_dim=32)
    assert counted(lambda: tower(pixels)) == cost.flops(3 * n, 3 * n * n)
    assert cost.flops(3 * n, 3 * n * n) == 2 * cost.params * 3 * n + 4 * 2 * 32 * 3 * n * n


def test_segment_square_sum():
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 1, 1, 1, 1]])
    assert segment_square_sum(segments) == 9 + 4 + 1 + 25


def _task_step(task, batch):
    def step():
        out = task(batch)
        out.loss.backward()

    return step


@pytest.mark.parametrize("stage", ["align", "sft", "lora"])
def test_vlm_task_flops_match_torch_count(vqa, tmp_path, stage):
    """One sample (one row, no padding, so the row's attention is the sample's): the task's count
    equals torch's. The frozen tower runs forward only; under a trained projector the frozen LM
    (or its LoRA base) still passes gradients (4P per token)."""
    from test_vlm_task import decoded, vlm_task

    from core.data.packing import supervised_targets

    extra = {
        "align": {},
        "sft": {"task.stage": "sft"},
        "lora": {"task.stage": "sft", "task.lm_tuning": "lora", "task.lora.r": 4},
    }[stage]
    task = vlm_task(vqa, tmp_path, **extra)
    for subset in ("shapes_colour", "shapes_text"):  # with an image, and text-only
        (sample,) = decoded(task, vqa, subset, 1)
        ids, labels = sample["input_ids"][None], sample["labels"][None]
        segments = torch.zeros_like(ids)
        batch = {
            "input_ids": ids, "labels": labels, "segment_ids": segments,
            "pixel_values": sample["pixel_values"], "num_samples": 1,
            "real_tokens": ids.shape[1],
            "supervised_tokens": int(supervised_targets(labels, segments).sum()),
        }  # fmt: skip
        assert task.flops(batch) == counted(_task_step(task, batch)), subset
        task.zero_grad(set_to_none=True)


def test_siglip_task_flops_match_torch_count_but_the_loss(shapes_dir, tmp_path):
    """All but the sigmoid loss's [B, B] similarity matmul, which the count leaves out."""
    from test_train import tiny_overrides

    from core.recipe import load_config
    from core.tasks import build_task

    task = build_task(load_config("tiny_siglip", tiny_overrides(shapes_dir, tmp_path, 1)))
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 9, 12, 3])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    batch = {
        "pixel_values": torch.randn(4, 3, 32, 32, generator=g),
        "input_ids": torch.randint(0, 50, (4, 12), generator=g),
        "attention_mask": mask,
    }
    # The text tower runs padded rows; the count is of real tokens (model FLOPs): compare with
    # unpadded rows, one at a time, plus the image tower on all four.
    ours = task.flops(batch)
    total = 0
    for i in range(4):
        one = {k: v[i : i + 1, : int(lengths[i])] if k != "pixel_values" else v[i : i + 1]
               for k, v in batch.items()}  # fmt: skip
        total += counted(_task_step(task, one))
    loss_matmul = 2 * 1 * 1 * 32 * 3  # per single-pair batch: [1, D] x [D, 1], fwd + bwd
    assert ours == total - 4 * loss_matmul


def test_window_reports_flops_per_second_and_mfu():
    from core.flops import peak_flops
    from core.loop import StepResult, _Window

    def result(flops):
        return StepResult(loss=1.0, grad_norm=1.0, stepped=True, samples=8, tokens=80,
                          data_wait=0.0, task_metrics={}, flops=flops)  # fmt: skip

    window = _Window(peak=4e12)
    window.add(0.5, result(1e12))
    window.add(1.5, result(3e12))
    out = window.flush()
    assert out["flops_per_s"] == 2e12 and out["mfu"] == 0.5
    assert "flops_per_s" not in _Window().flush()  # a task that counts no FLOPs: no figure
    unknown = _Window(peak=None)
    unknown.add(1.0, result(1e9))
    assert unknown.flush()["flops_per_s"] == 1e9 and "mfu" not in unknown.flush()
    assert peak_flops(torch.device("cpu"), "bf16") is None  # CPUs: no table, no MFU
