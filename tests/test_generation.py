"""core.models.generation vs transformers' generate, token for token, on tiny random fp32 models."""

import contextlib

import pytest
import torch
import transformers as hf

import core.models
from core.models.cache import KVCache
from core.models.generation import GenerationConfig, generate

VOCAB = 128
PAD = VOCAB - 1  # not 0: transformers' beam search fills with eos when pad_token_id is 0
NEW = 12  # max_new_tokens
SMALL = dict(vocab_size=VOCAB, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "qwen2": hf.Qwen2Config(**SMALL, hidden_size=64, num_key_value_heads=2),
    "gemma": hf.GemmaConfig(**SMALL, hidden_size=48, num_key_value_heads=1, head_dim=16),
    # peaked enough that beam search, eos and sampling checks all have something to show
    "llama": hf.LlamaConfig(
        **SMALL, hidden_size=48, num_key_value_heads=1, head_dim=16, mlp_bias=True
    ),
}
# (temperature, top_k, top_p); top_k 0 = off (transformers' own default would be 50)
WARPERS = [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.8), (0.7, 20, 0.9)]


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Large random weights: peaked next-token distributions that vary along the sequence (a
    transformers init gives near-uniform ones that loop on one token)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its checkpoint)."""
    path = tmp_path_factory.mktemp(request.param)
    theirs = hf.AutoModelForCausalLM.from_config(CONFIGS[request.param], attn_implementation="sdpa")
    randomize(theirs).save_pretrained(path)
    theirs.generation_config = hf.GenerationConfig()  # no eos / pad from the model config
    return theirs, core.models.from_pretrained(path)


def prompts():
    """3 prompts of 10 tokens, rows 0 and 2 left-padded (3 and 6 pad positions)."""
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :6] = 0
    return ids, mask


def theirs_generate(theirs, ids, mask, seed=None, **options):
    if seed is not None:
        torch.manual_seed(seed)
    out = theirs.generate(ids, attention_mask=mask, max_new_tokens=NEW, **options)
    return out[:, ids.shape[1] :]


def ours_generate(ours, ids, mask, seed=None, **options):
    if seed is not None:
        torch.manual_seed(seed)
    return generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, **options)


def eos_cases(free: torch.Tensor) -> dict:
    """No eos, one and two eos tokens taken from an unconstrained run, so beams do reach them."""
    return {"none": None, "one": int(free[1, 3]), "two": [int(free[0, 5]), int(free[2, 2])]}


@pytest.mark.parametrize("eos", ["none", "one", "two"])
def test_greedy_matches_transformers(pair, eos):
    theirs, ours = pair
    ids, mask = prompts()
    eos = eos_cases(ours_generate(ours, ids, mask))[eos]
    expected = theirs_generate(theirs, ids, mask, eos_token_id=eos, pad_token_id=PAD)
    got = ours_generate(ours, ids, mask, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(got, expected)
    if eos is not None:  # rows that ended are filled with pad
        ended = torch.isin(got, torch.tensor(eos)).int().cummax(1).values.bool()
        assert ended.any()
        assert (got[:, 1:][ended[:, :-1]] == PAD).all()


@pytest.mark.parametrize("num_beams", [3, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -1.0])
@pytest.mark.parametrize("eos", ["none", "one", "two"])
def test_beam_search_matches_transformers(pair, num_beams, length_penalty, eos):
    theirs, ours = pair
    ids, mask = prompts()
    beams = dict(num_beams=num_beams, do_sample=False, length_penalty=length_penalty)
    eos = eos_cases(theirs_generate(theirs, ids, mask, **beams))[eos]
    expected = theirs_generate(theirs, ids, mask, **beams, eos_token_id=eos, pad_token_id=PAD)
    got = ours_generate(ours, ids, mask, **beams, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(got, expected)
    if eos is not None and length_penalty <= 1.0:  # (2.0 favours the long ones without eos)
        assert torch.isin(got, torch.tensor(eos)).any()  # best hypotheses that ended at eos
    greedy = ours_generate(ours, ids, mask, eos_token_id=eos, pad_token_id=PAD)
    assert not torch.equal(got, greedy)  # beam search found other sequences


def test_beam_search_stops_at_eos(pair):
    """Rows whose best hypothesis ended early are filled after their eos; the output is as long
    as the longest best hypothesis and decoding stops once no running beam can beat them."""
    theirs, ours = pair
    ids, mask = prompts()
    free = ours_generate(ours, ids, mask, num_beams=3)
    eos = free[:, 2:4].flatten().tolist()  # each row's third and fourth tokens
    beams = dict(num_beams=3, length_penalty=0.0, eos_token_id=eos, pad_token_id=PAD)
    with count_forwards(ours) as ours_forwards:  # no bonus for length: short ones win
        got = ours_generate(ours, ids, mask, **beams)
    with count_forwards(theirs) as theirs_forwards:
        expected = theirs_generate(theirs, ids, mask, **beams)
    assert torch.equal(got, expected)
    assert (got == PAD).any()
    assert got.shape[1] < len(ours_forwards) == len(theirs_forwards) < NEW


@contextlib.contextmanager
def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("temperature, top_k, top_p", WARPERS)
def test_sampling_matches_transformers(pair, temperature, top_k, top_p):
    theirs, ours = pair
    ids, mask = prompts()
    warpers = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    samples = []
    for seed in (0, 1):
        expected = theirs_generate(theirs, ids, mask, seed, **warpers)
        got = ours_generate(ours, ids, mask, seed, **warpers)
        assert torch.equal(got, expected)
        samples.append(got)
    assert not torch.equal(*samples)  # really sampled
    assert not torch.equal(samples[0], ours_generate(ours, ids, mask))


def test_sampling_with_eos_and_generator(pair):
    theirs, ours = pair
    ids, mask = prompts()
    options = dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.95, pad_token_id=PAD)
    eos = [int(t) for t in ours_generate(ours, ids, mask, 0, **options)[:, 4]]
    expected = theirs_generate(theirs, ids, mask, 0, **options, eos_token_id=eos)
    assert torch.equal(ours_generate(ours, ids, mask, 0, **options, eos_token_id=eos), expected)
    assert (expected == PAD).any()
    # A generator gives the same draws as the global RNG seeded alike.
    generator = torch.Generator().manual_seed(0)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, generator=generator,
                   **options, eos_token_id=eos)  # fmt: skip
    assert torch.equal(got, expected)


@pytest.mark.parametrize("temperature, top_k, top_p", WARPERS[1:])
def test_beam_sampling_matches_transformers(pair, temperature, top_k, top_p):
    theirs, ours = pair
    ids, mask = prompts()
    options = dict(num_beams=3, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    eos = eos_cases(theirs_generate(theirs, ids, mask, 0, **options))["two"]
    for seed in (0, 1):
        expected = theirs_generate(theirs, ids, mask, seed, **options, eos_token_id=eos,
                                   pad_token_id=PAD)  # fmt: skip
        got = ours_generate(ours, ids, mask, seed, **options, eos_token_id=eos, pad_token_id=PAD)
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(do_sample=True, top_k=0, top_p=0.9), dict(num_beams=3)],
    ids=["greedy", "sample", "beam"],
)
def test_inputs_embeds_prompt(pair, options):
    """Embedding the prompt ourselves gives the ids' tokens; spliced-in non-token embeddings (a
    VLM's image features) give transformers' tokens for the same inputs_embeds."""
    theirs, ours = pair
    ids, mask = prompts()
    options = dict(options, max_new_tokens=NEW, eos_token_id=int(ids[1, 4]), pad_token_id=PAD)

    def ours_generate(**prompt):
        torch.manual_seed(0)
        return generate(ours, **prompt, **options)

    def theirs_generate(**prompt):
        torch.manual_seed(0)
        return theirs.generate(**prompt, **options)  # only new tokens without input_ids

    embeds = ours.embed(ids)
    got = ours_generate(inputs_embeds=embeds, attention_mask=mask)
    assert torch.equal(got, ours_generate(input_ids=ids, attention_mask=mask))
    assert torch.equal(got, theirs_generate(inputs_embeds=embeds, attention_mask=mask))
    image = torch.randn(3, 4, embeds.shape[-1], generator=torch.Generator().manual_seed(3))
    spliced = dict(
        inputs_embeds=torch.cat([embeds[:, :6], image, embeds[:, 6:]], dim=1),
        attention_mask=torch.cat([mask[:, :6], torch.ones_like(mask[:, :4]), mask[:, 6:]], 1),
    )
    assert torch.equal(ours_generate(**spliced), theirs_generate(**spliced))


def test_prefix_lm_beam_search_rows_keep_their_prefix(pair):
    """PaliGemma's prefix attention under beam search: every beam of a row keeps its row's
    prefix_len and padding through the cache reorders, so a batch decodes like its rows alone."""
    _, ours = pair
    ids, mask = prompts()
    pads = (mask == 0).sum(1)
    prefix_len = pads + torch.tensor([4, 7, 3])  # counted from the row start, padding included
    options = dict(max_new_tokens=NEW, num_beams=3, eos_token_id=int(ids[1, 5]), pad_token_id=PAD)
    batched = generate(ours, ids, attention_mask=mask, prefix_len=prefix_len, **options)
    for row in range(3):
        alone = generate(
            ours, ids[row : row + 1, pads[row] :], prefix_len=prefix_len[row : row + 1] - pads[row],
            **options,
        )  # fmt: skip
        assert torch.equal(batched[row, : alone.shape[1]], alone[0])
        assert (batched[row, alone.shape[1] :] == PAD).all()
    causal = generate(ours, ids, attention_mask=mask, **options)
    assert not torch.equal(batched, causal)  # the prefix really is bidirectional


def test_kv_cache_reorder():
    cache = KVCache(num_layers=2, max_len=5)
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 2, 4)
    for layer in range(2):
        cache.update(layer, k, -k)
    cache.reorder(torch.tensor([2, 2, 0, 1]))
    for layer in range(2):
        keys, values = cache.update(layer, torch.zeros(4, 2, 1, 4), torch.zeros(4, 2, 1, 4))
        assert keys.shape == (4, 2, 3, 4)
        assert keys[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0, 1.0]
        assert values[:, 0, 1, 0].tolist() == [-2.0, -2.0, -0.0, -1.0]
    assert cache.length == 3


def test_config_options_and_decoder_generate(pair):
    _, ours = pair
    ids, mask = prompts()
    cfg = GenerationConfig(max_new_tokens=NEW, num_beams=3, eos_token_id=int(ids[1, 4]))
    beams = generate(ours, ids, attention_mask=mask, config=cfg)
    assert torch.equal(beams, generate(ours, ids, attention_mask=mask, **vars(cfg)))
    # Decoder.generate keeps its signature and forwards the options.
    assert torch.equal(ours.generate(ids, NEW, cfg.eos_token_id, mask, num_beams=3), beams)
    overridden = generate(ours, ids, attention_mask=mask, config=cfg, num_beams=1)
    assert torch.equal(overridden, ours.generate(ids, NEW, cfg.eos_token_id, mask))
    with pytest.raises(TypeError):
        generate(ours, ids, config=cfg, beams=2)
    with pytest.raises(ValueError, match="exactly one"):
        generate(ours, config=cfg)


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_new_tokens=0),
        dict(temperature=0.0),
        dict(top_k=-1),
        dict(top_p=1.5),
        dict(num_beams=0),
    ],  # fmt: skip
)
def test_invalid_config_raises(bad):
    with pytest.raises(ValueError, match="invalid GenerationConfig"):
        GenerationConfig(**{"max_new_tokens": 4, **bad})
