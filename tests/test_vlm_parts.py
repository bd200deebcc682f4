"""VLM building blocks: pixel shuffle, packing, LoRA (merge and peft adapter export)."""

from __future__ import annotations

import pytest
import torch
import transformers as hf

import core.models
from core.data.packing import PackedCollate, first_fit_decreasing, supervised_targets
from core.lora import LoraConfig, add_lora, has_lora, merge_lora_state, write_peft_adapter
from core.models.vlm import Projector, choose_shuffle, pixel_shuffle, splice_images


def test_pixel_shuffle_groups_neighbouring_patches():
    n, grid, dim, r = 2, 6, 3, 3
    x = torch.randn(n, grid * grid, dim)
    out = pixel_shuffle(x, r)
    assert out.shape == (n, (grid // r) ** 2, r * r * dim)
    patches = x.reshape(n, grid, grid, dim)
    g = grid // r
    for i in range(g):
        for j in range(g):
            block = patches[:, i * r : (i + 1) * r, j * r : (j + 1) * r].reshape(n, -1)
            torch.testing.assert_close(out[:, i * g + j], block, rtol=0, atol=0)


def test_shuffle_factor_for_target_tokens_and_clear_errors():
    assert choose_shuffle(27, 81) == 3  # siglip-so400m-patch14-384: 729 -> 81 tokens
    assert choose_shuffle(8, 16) == 2
    assert choose_shuffle(8, 0) == 1
    with pytest.raises(ValueError, match="possible: .*16"):
        choose_shuffle(8, 10)
    with pytest.raises(ValueError, match="does not divide the 8x8"):
        pixel_shuffle(torch.randn(1, 64, 4), 3)
    proj = Projector(4, 10, 2, "layernorm")
    assert proj(torch.randn(3, 64, 4)).shape == (3, 16, 10)
    with pytest.raises(ValueError, match="unknown projector kind"):
        Projector(4, 10, 2, "conv")


def test_splice_puts_images_in_order():
    embeds = torch.zeros(2, 5, 1)
    ids = torch.tensor([[7, 9, 9, 7, 7], [9, 9, 7, 7, 7]])
    images = torch.arange(1.0, 5.0).reshape(2, 2, 1)
    out = splice_images(embeds, ids, images, image_token_id=9)
    assert out[..., 0].tolist() == [[0, 1, 2, 0, 0], [3, 4, 0, 0, 0]]


def test_first_fit_decreasing_fills_rows():
    lengths = [9, 2, 7, 3, 1, 8, 5]
    rows = first_fit_decreasing(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 35 tokens: 4 rows of 10 is the optimum
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([11], 10)


def _sample(tokens, supervised_from, images=0, image_id=9, per_image=2):
    ids = [image_id] * (images * per_image) + tokens
    labels = [-100] * (len(ids) - len(tokens) + supervised_from) + tokens[supervised_from:]
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": torch.randn(images, 3, 4, 4),
    }


def test_packed_collate_segments_labels_images_and_counts():
    samples = [_sample([1, 2, 3, 4], 2, images=1), _sample([5, 6], 1), _sample([7, 8, 3], 1, 2)]
    batch = PackedCollate(max_seq_len=16, pad_id=0, image_token_id=9, tokens_per_image=2)(samples)
    assert batch["input_ids"].shape == (1, 16)
    assert batch["num_samples"] == 3 and batch["real_tokens"] == 6 + 2 + 7
    # longest first: sample 2 (7 tokens), sample 0 (6), sample 1 (2); then padding (-1)
    assert batch["segment_ids"][0].tolist() == [0] * 7 + [1] * 6 + [2] * 2 + [-1]
    assert batch["pixel_values"].shape[0] == 3
    torch.testing.assert_close(batch["pixel_values"][:2], samples[2]["pixel_values"])
    # targets: 2 of sample 2 ([8, 3]), 2 of sample 0 ([3, 4]), 1 of sample 1 ([6])
    assert batch["supervised_tokens"] == 5
    where = supervised_targets(batch["labels"], batch["segment_ids"])
    assert batch["labels"][:, 1:][where].tolist() == [8, 3, 3, 4, 6]
    with pytest.raises(ValueError, match="image-pad tokens for 1 images"):
        bad = _sample([1, 2], 1, images=1)
        bad["pixel_values"] = torch.randn(1, 3, 4, 4)
        bad["input_ids"] = torch.tensor([1, 2, 3, 4])
        PackedCollate(16, 0, 9, 2)([bad])


# ---------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    config = hf.Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def _lora_model(path, lora):
    ours = core.models.from_pretrained(path)
    add_lora(ours, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:  # peft initialises B to 0: make the adapters matter
                p.normal_(0, 0.1)
    return ours.eval()


def test_lora_trains_only_adapters_and_merges_exactly(qwen2):
    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    ours = _lora_model(qwen2, lora)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B x 7 targets x 2 layers
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)
    state = ours.state_dict()
    assert has_lora(state)
    merged = merge_lora_state(state, lora.alpha)
    assert not has_lora(merged)
    plain = core.models.from_pretrained(qwen2)
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), expected, rtol=1e-5, atol=1e-5)


def test_peft_adapter_export_loads_in_peft(qwen2, tmp_path):
    from peft import PeftModel

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])
    ours = _lora_model(qwen2, lora)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)
    state = {f"lm.{k}": v for k, v in ours.state_dict().items()}
    write_peft_adapter(state, "lm.", lora, tmp_path / "adapter", base_model=str(qwen2))
    base = hf.Qwen2ForCausalLM.from_pretrained(qwen2)
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        write_peft_adapter(state, "vision.", lora, tmp_path / "none", base_model="x")
