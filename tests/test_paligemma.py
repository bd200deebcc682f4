"""PaliGemma (core/models/paligemma.py) against transformers' PaliGemmaForConditionalGeneration:
logits, the checkpoint round trip both ways, the prefix-LM mask's properties, and generation."""

from __future__ import annotations

import pytest
import torch
import transformers as hf

import core.models
from core.models import hub
from core.models.attention import ar_mask, build_mask
from core.models.paligemma import PaliGemma

TOL = 1e-5
VOCAB = 96
IMAGE = VOCAB - 1  # the image token id (inside the vocabulary, as the real checkpoints')
N_IMG = 4  # 16 px images, 8 px patches


def tiny_config(tie: bool = True) -> hf.PaliGemmaConfig:
    vision = dict(
        model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8,
        vision_use_head=False,
    )  # fmt: skip
    text = dict(
        model_type="gemma", vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        tie_word_embeddings=tie,
    )  # fmt: skip
    return hf.PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE, projection_dim=48,
        hidden_size=48, vocab_size=VOCAB, tie_word_embeddings=tie,
    )  # fmt: skip


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1 if p.dim() > 1 else 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request, tmp_path_factory):
    """(transformers model, its save_pretrained dir, ours loaded from that dir)."""
    path = tmp_path_factory.mktemp("paligemma")
    theirs = randomize(hf.PaliGemmaForConditionalGeneration(tiny_config(request.param)))
    theirs.save_pretrained(path)
    return theirs, path, core.models.from_pretrained(path)


def batch(seed: int = 0, text: int = 8, pad: int = 0):
    """input_ids [2, N_IMG + text], pixel_values [2, 3, 16, 16], token_type_ids (4 prefix text
    tokens, the rest suffix), attention_mask (the last `pad` tokens of row 1 are padding)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(0, VOCAB - 1, (2, text), generator=g)
    input_ids = torch.cat([torch.full((2, N_IMG), IMAGE), words], dim=1)
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    token_type = torch.zeros_like(input_ids)
    token_type[:, N_IMG + 4 :] = 1
    mask = torch.ones_like(input_ids)
    if pad:
        mask[1, -pad:] = 0
    return input_ids, pixels, token_type, mask


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_from_pretrained_gives_the_whole_model_with_transformers_logits(pair):
    theirs, _, ours = pair
    assert isinstance(ours, PaliGemma)
    ids, px, tt, mask = batch(pad=3)
    want = theirs(input_ids=ids, pixel_values=px, token_type_ids=tt, attention_mask=mask).logits
    got = ours(input_ids=ids, pixel_values=px, token_type_ids=tt, attention_mask=mask)
    real = mask.bool()
    assert max_diff(got[real], want[real]) <= TOL
    # The prefix is really bidirectional in both: with every token causal the logits differ.
    causal = ours(input_ids=ids, pixel_values=px, token_type_ids=torch.ones_like(tt))
    assert max_diff(causal[:, : N_IMG + 4], got[:, : N_IMG + 4]) > 1e-3


@torch.no_grad()
def test_transformers_in_memory_layout_loads_too(pair, tmp_path):
    theirs, path, ours = pair
    hub.save_state_dict(theirs.state_dict(), tmp_path)  # model.vision_tower.*, lm_head.weight
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    again = core.models.from_pretrained(tmp_path)
    ids, px, tt, _ = batch(seed=1)
    assert max_diff(again(ids, px, tt), ours(ids, px, tt)) == 0


@torch.no_grad()
def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    theirs, _, ours = pair
    core.models.save_pretrained(ours, tmp_path)
    back, info = hf.PaliGemmaForConditionalGeneration.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    ids, px, tt, _ = batch(seed=2)
    want = theirs(input_ids=ids, pixel_values=px, token_type_ids=tt).logits
    assert (
        max_diff(back.eval()(input_ids=ids, pixel_values=px, token_type_ids=tt).logits, want) == 0
    )
    # and ours reads its own export back
    assert max_diff(core.models.from_pretrained(tmp_path)(ids, px, tt), want) <= TOL


def test_checkpoint_with_unknown_tensors_is_refused(pair, tmp_path):
    _, path, ours = pair
    state = ours.hf_state_dict()
    state["multi_modal_projector.extra.weight"] = torch.zeros(1)
    hub.save_state_dict(state, tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(KeyError, match="unexpected"):
        core.models.from_pretrained(tmp_path)


# ------------------------------------------------------------------- the prefix-LM mask


def test_mask_rule_is_big_vision_s():
    """i sees j iff cumsum(mask_ar)[j] <= cumsum(mask_ar)[i], checked against a brute force."""
    mask_ar = torch.tensor([[0, 0, 0, 1, 1, 0, 1]])
    groups = mask_ar.cumsum(-1)[0].tolist()
    want = torch.tensor([[[groups[j] <= groups[i] for j in range(7)] for i in range(7)]])
    assert torch.equal(ar_mask(mask_ar, 7), want)
    # prefix_len is the same rule with the prefix at the row start
    by_len = build_mask("prefix", 7, 7, device=torch.device("cpu"), prefix_len=torch.tensor([3]))
    as_ar = build_mask("prefix", 7, 7, device=torch.device("cpu"),
                       mask_ar=torch.tensor([[0, 0, 0, 1, 1, 1, 1]]))  # fmt: skip
    assert torch.equal(by_len, as_ar)
    causal = build_mask("causal", 7, 7, device=torch.device("cpu"))
    all_ar = build_mask("prefix", 7, 7, device=torch.device("cpu"), mask_ar=torch.ones(1, 7))
    assert torch.equal(causal.expand_as(all_ar), all_ar)


@torch.no_grad()
def test_suffix_token_changes_nothing_before_it(pair):
    _, _, ours = pair
    ids, px, tt, _ = batch(seed=3)
    t = N_IMG + 6  # a suffix position
    other = ids.clone()
    other[:, t] = (other[:, t] + 1) % (VOCAB - 1)
    a, b = ours(ids, px, tt), ours(other, px, tt)
    assert max_diff(a[:, :t], b[:, :t]) == 0
    assert max_diff(a[:, t:], b[:, t:]) > 1e-4


@torch.no_grad()
def test_prefix_token_changes_earlier_prefix_positions(pair):
    _, _, ours = pair
    ids, px, tt, _ = batch(seed=4)
    t = N_IMG + 3  # the last prefix text token
    other = ids.clone()
    other[:, t] = (other[:, t] + 1) % (VOCAB - 1)
    a, b = ours(ids, px, tt), ours(other, px, tt)
    assert max_diff(a[:, :t], b[:, :t]) > 1e-4  # image tokens and earlier prefix text see it


@torch.no_grad()
def test_pad_contents_change_nothing(pair):
    _, _, ours = pair
    ids, px, tt, mask = batch(seed=5, pad=3)
    other = ids.clone()
    other[1, -3:] = (other[1, -3:] + 7) % (VOCAB - 1)
    a, b = ours(ids, px, tt, mask), ours(other, px, tt, mask)
    real = mask.bool()
    assert max_diff(a[real], b[real]) == 0


@torch.no_grad()
def test_packed_row_gives_each_sample_its_own_logits(pair):
    _, _, ours = pair
    ids, px, tt, _ = batch(seed=6)
    alone = ours(ids, px, tt)
    # both samples in one row, then 2 padding tokens
    row = torch.cat([ids[0], ids[1], torch.zeros(2, dtype=torch.long)])[None]
    row_tt = torch.cat([tt[0], tt[1], torch.ones(2, dtype=torch.long)])[None]
    n = ids.shape[1]
    segments = torch.tensor([[0] * n + [1] * n + [-1] * 2])
    packed = ours(row, px, mask_ar=row_tt, segment_ids=segments)
    assert max_diff(packed[0, :n], alone[0]) <= TOL
    assert max_diff(packed[0, n : 2 * n], alone[1]) <= TOL


# ------------------------------------------------------------------- generation


@torch.no_grad()
@pytest.mark.parametrize("options", [dict(), dict(num_beams=3)], ids=["greedy", "beam"])
def test_generate_equals_transformers(pair, options):
    theirs, _, ours = pair
    g = torch.Generator().manual_seed(7)
    # left-padded prompts of 3 and 5 text tokens after the image tokens
    lengths = (3, 5)
    width = N_IMG + max(lengths)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        prompt = torch.cat(
            [torch.full((N_IMG,), IMAGE), torch.randint(2, VOCAB - 1, (n,), generator=g)]
        )
        ids[row, -len(prompt) :] = prompt
        mask[row, -len(prompt) :] = 1
    px = torch.randn(2, 3, 16, 16, generator=g)
    eos = 1
    want = theirs.generate(
        input_ids=ids, pixel_values=px, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
        max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0, **options,
    )[:, width:]  # fmt: skip
    got = ours.generate(ids, px, 8, attention_mask=mask, eos_token_id=eos, pad_token_id=0,
                        **options)  # fmt: skip
    assert got.tolist() == want[:, : got.shape[1]].tolist()
    assert (want[:, got.shape[1] :] == 0).all()  # transformers pads finished rows further


def test_sampling_runs_and_is_seeded(pair):
    _, _, ours = pair
    ids, px, _, _ = batch(seed=8)
    prompt = ids[:, : N_IMG + 4]
    a = ours.generate(
        prompt, px, 6, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(1)
    )
    b = ours.generate(
        prompt, px, 6, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(1)
    )
    assert a.tolist() == b.tolist() and a.shape[1] >= 1
