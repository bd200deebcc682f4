"""Decoding for `Decoder`: greedy, sampling (temperature, top-k, top-p) and beam search.

    new = generate(model, prompt_ids, attention_mask=pad_mask, max_new_tokens=32, eos_token_id=eos)
    cfg = GenerationConfig(max_new_tokens=32, do_sample=True, temperature=0.7, top_p=0.9)
    new = generate(model, inputs_embeds=x, prefix_len=p, config=cfg)  # image tokens spliced in
    new = generate(model, prompt_ids, config=cfg, num_beams=4, do_sample=False)  # cfg + overrides

Batched prompts are left-padded, real tokens marked by attention_mask [B, T]. With prefix_len [B]
(counted from the row start, padding included) the prompt's prefix is bidirectional (PaliGemma).
The result holds the new tokens only, [B, <= max_new_tokens]; decoding stops once every row has
emitted an eos token, and a finished row is filled with pad_token_id (eos if None) after its eos.

Each strategy follows transformers' `generate` (5.x) step by step: logits in fp32, the sampling
warpers in its order (temperature, top-k, top-p), `torch.multinomial` draws from the global RNG
(or `generator`) on the same tensors, and its beam search bookkeeping with the default
`early_stopping=False` heuristic. With the same weights and seed the tokens are transformers'.
Known differences:
  - top_k defaults to 0 (off); transformers' default generation config samples with top_k=50.
  - beam search fills finished rows with pad_token_id; transformers fills them with eos when
    pad_token_id is 0 (it writes `pad_token_id or eos_token_id[0]`).
  - only early_stopping=False (transformers' default) is implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .. import distributed
from .cache import KVCache

IMPOSSIBLE = -1.0e9  # transformers' score for beams that must not be picked


@dataclass
class GenerationConfig:
    max_new_tokens: int
    do_sample: bool = False  # else greedy (num_beams 1) or beam search
    temperature: float = 1.0  # the sampling options act only with do_sample
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    num_beams: int = 1
    length_penalty: float = 1.0  # beam scores are sum(log p) / new_tokens**length_penalty
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None  # fills finished rows; None = the first eos token

    def __post_init__(self):
        checks = {
            "max_new_tokens >= 1": self.max_new_tokens >= 1,
            "temperature > 0": self.temperature > 0,
            "top_k >= 0": self.top_k >= 0,
            "0 <= top_p <= 1": 0 <= self.top_p <= 1,
            "num_beams >= 1": self.num_beams >= 1,
        }
        failed = [check for check, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid {self}: needs {', '.join(failed)}")


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    **options,
) -> torch.Tensor:
    """New tokens [B, <= max_new_tokens] after the prompt input_ids [B, T] or inputs_embeds
    [B, T, H]. `options` are GenerationConfig fields (they override `config`'s). `model` is a
    `Decoder` (anything with its `embed`, `layers`, `lm_head` and forward arguments)."""
    cfg = GenerationConfig(**options) if config is None else replace(config, **options)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = model.embed(input_ids) if inputs_embeds is None else inputs_embeds
    stepper = Stepper(model, x.shape[1] + cfg.max_new_tokens, attention_mask, prefix_len)
    logits = stepper.prompt(x)
    search = beam_search if cfg.num_beams > 1 else sample
    return search(stepper, logits, cfg, generator)


class Stepper:
    """The model decoding over a KV cache: the prompt once, then one token per row per step."""

    def __init__(self, model, max_len: int, attention_mask, prefix_len):
        self.model = model
        self.cache = KVCache(len(model.layers), max_len)
        self.attention_mask = attention_mask
        self.prefix_len = prefix_len
        self.rows = 0

    def prompt(self, embeds: torch.Tensor) -> torch.Tensor:
        """fp32 logits [B, V] of the token after the prompt embeds [B, T, H]."""
        self.rows, self.device = embeds.shape[0], embeds.device
        return self._forward(inputs_embeds=embeds)

    def finished(self, done: bool) -> bool:
        """Whether decoding ends after this step (distributed.finished): in lockstep, a rank
        that is done steps on with a dropped token per row while another rank decodes."""

        def pad():  # made only when padding: not an allocation per decoding step
            return self.step(torch.zeros(self.rows, dtype=torch.long, device=self.device))

        return distributed.finished(done, pad)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """fp32 logits [B, V] of the token after tokens [B]."""
        if self.attention_mask is not None:
            mask = self.attention_mask
            self.attention_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return self._forward(input_ids=tokens[:, None])

    def reorder(self, index: torch.Tensor) -> None:
        """Row i continues row index[i] (beam search: repeat prompts, follow surviving beams)."""
        self.rows = index.shape[0]
        self.cache.reorder(index)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[index]
        if self.prefix_len is not None:
            self.prefix_len = self.prefix_len[index]

    def _forward(self, **inputs) -> torch.Tensor:
        hidden = self.model(
            **inputs, mask_kind="causal" if self.prefix_len is None else "prefix",
            prefix_len=self.prefix_len, attention_mask=self.attention_mask, cache=self.cache,
            return_hidden=True,
        )  # fmt: skip
        return self.model.lm_head(hidden[:, -1]).float()


def warp(scores: torch.Tensor, cfg: GenerationConfig, min_keep: int = 1) -> torch.Tensor:
    """transformers' sampling warpers in its order: temperature, top-k, top-p. Removed tokens get
    -inf; each filter keeps at least `min_keep` tokens."""
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k:
        k = min(max(cfg.top_k, min_keep), scores.shape[-1])
        kth_best = torch.topk(scores, k).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, -float("inf"))
    if cfg.top_p < 1.0:
        ascending, order = torch.sort(scores, descending=False)
        remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - cfg.top_p
        remove[..., -min_keep:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores


def sample(
    stepper: Stepper,
    logits: torch.Tensor,
    cfg: GenerationConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy (argmax) or sampled tokens, one per row per step, from the prompt's logits [B, V]."""
    eos = _eos_tensor(cfg, logits.device)
    pad = _fill_token(cfg)
    unfinished = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    tokens = []
    for step in range(cfg.max_new_tokens):
        if step:
            logits = stepper.step(tokens[-1])
        token = _pick(logits, cfg, generator)
        if eos is not None:
            token = torch.where(unfinished, token, pad)
            unfinished &= ~torch.isin(token, eos)
        tokens.append(token)
        # .any() syncs with the GPU: only where there is an end to find (or ranks to keep pace)
        ended = eos is not None and not unfinished.any()
        if (eos is not None or distributed.in_lockstep()) and stepper.finished(
            ended or step + 1 == cfg.max_new_tokens
        ):
            break
    return torch.stack(tokens, dim=1)


def _pick(logits: torch.Tensor, cfg: GenerationConfig, generator) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    probs = F.softmax(warp(logits, cfg), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def beam_search(
    stepper: Stepper,
    logits: torch.Tensor,
    cfg: GenerationConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Beam search (beam sampling with do_sample) from the prompt's logits [B, V] -> each row's
    best finished hypothesis, filled after its end."""
    (B, V), n, steps = logits.shape, cfg.num_beams, cfg.max_new_tokens
    device = logits.device
    eos = _eos_tensor(cfg, device)
    # Tokens kept per beam (one more than there are eos tokens): n beams can go on even if the
    # best candidates all end.
    per_beam = max(2, 1 + (0 if eos is None else len(eos)))
    k = per_beam * n  # candidates per row and step
    rows = torch.arange(B, device=device).repeat_interleave(n)
    stepper.reorder(rows)  # each prompt's cache once per beam
    logits = logits[rows]
    tokens = torch.full((B, n, steps), _fill_token(cfg), dtype=torch.long, device=device)
    scores = torch.zeros(B, n, device=device)  # running beams: sum of log-probs
    scores[:, 1:] = IMPOSSIBLE  # the beams start identical: expand only the first
    finished = Finished.empty(tokens)
    improvable = torch.ones(B, dtype=torch.bool, device=device)
    first_beam = n * torch.arange(B, device=device)[:, None]  # flat row of each prompt's beam 0
    for step in range(steps):
        if step:
            logits = stepper.step(tokens[:, :, step - 1].flatten())
        log_probs = F.log_softmax(logits, dim=-1)
        if cfg.do_sample:  # transformers warps the log-probs here, not the logits
            log_probs = warp(log_probs, cfg, min_keep=per_beam)
        total = (log_probs.view(B, n, V) + scores[..., None]).view(B, n * V)
        cand_scores, cand = _candidates(total, k, cfg.do_sample, generator)
        cand_beam = cand // V
        cand_tokens = _gather(tokens, cand_beam)
        cand_tokens[:, :, step] = cand % V
        ends = torch.full_like(cand, step + 1 == steps, dtype=torch.bool)
        if eos is not None:
            ends |= torch.isin(cand % V, eos)
        # The best n candidates that did not end go on.
        alive = cand_scores + ends.float() * IMPOSSIBLE
        keep = torch.topk(alive, n).indices
        tokens, scores = _gather(cand_tokens, keep), _gather(alive, keep)
        # Of the candidates that ended, only those among the first n may be kept.
        ended = ends & (torch.arange(k, device=device) < n)
        penalty = (step + 1) ** cfg.length_penalty
        finished.add(cand_tokens, cand_scores / penalty, step + 1, ended, improvable)
        improvable &= finished.improvable_by(scores[:, 0] / penalty)
        # syncs with the GPU, as transformers does; the last step ends every candidate
        if stepper.finished(bool(not improvable.any() or ends.all())):
            break
        stepper.reorder((first_beam + _gather(cand_beam, keep)).flatten())
    return finished.tokens[:, 0, : int(finished.lengths[:, 0].max())]


@dataclass
class Finished:
    """The n best ended hypotheses of each row, best first; IMPOSSIBLE-scored placeholders
    until n have ended."""

    tokens: torch.Tensor  # [B, n, max_new_tokens], filled after each hypothesis' end
    scores: torch.Tensor  # [B, n]: sum of log-probs / length**length_penalty
    lengths: torch.Tensor  # [B, n] new tokens, eos included
    real: torch.Tensor  # [B, n] bool: an ended hypothesis, not a placeholder

    @classmethod
    def empty(cls, filled: torch.Tensor) -> Finished:
        """Placeholders only, their tokens `filled` [B, n, max_new_tokens]."""
        B, n = filled.shape[:2]
        scores = torch.full((B, n), IMPOSSIBLE, device=filled.device)
        none = torch.zeros((B, n), dtype=torch.bool, device=filled.device)
        return cls(filled.clone(), scores, torch.zeros_like(filled[..., 0]), none)

    def add(self, tokens, scores, length: int, ended, improvable) -> None:
        """Keep the best n of the current ones and of the candidates that `ended` in rows that
        are still `improvable` (candidates [B, k, ...], scores length-penalised)."""
        scores = scores + (~improvable[:, None]).float() * IMPOSSIBLE
        scores = scores + (~ended).float() * IMPOSSIBLE
        all_scores = torch.cat([self.scores, scores], dim=1)
        best = torch.topk(all_scores, self.scores.shape[1]).indices
        self.tokens = _gather(torch.cat([self.tokens, tokens], dim=1), best)
        self.scores = _gather(all_scores, best)
        lengths = torch.full_like(ended, length, dtype=torch.long)
        self.lengths = _gather(torch.cat([self.lengths, lengths], dim=1), best)
        self.real = _gather(torch.cat([self.real, ended], dim=1), best)

    def improvable_by(self, best_running: torch.Tensor) -> torch.Tensor:
        """[B] bool: can the best running score [B] (penalised at the current length, as
        transformers' early_stopping=False heuristic assumes) beat a kept hypothesis?"""
        worst = self.scores.min(dim=1, keepdim=True).values
        worst = torch.where(self.real, worst, IMPOSSIBLE)
        return (best_running[:, None] > worst).any(dim=1)


def _candidates(total: torch.Tensor, k: int, do_sample: bool, generator):
    """(scores, flat beam*vocab indices) [B, k] of the best (or sampled) continuations."""
    if do_sample:
        index = torch.multinomial(F.softmax(total, dim=-1), num_samples=k, generator=generator)
        return total.gather(1, index), index
    return torch.topk(total, k)


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[b, index[b, i], ...] for t [B, n, ...], index [B, m]."""
    index = index.view(*index.shape, *([1] * (t.dim() - 2)))
    return torch.take_along_dim(t, index, dim=1)


def _eos_tensor(cfg: GenerationConfig, device) -> torch.Tensor | None:
    eos = cfg.eos_token_id
    if eos is None:
        return None
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device)


def _fill_token(cfg: GenerationConfig) -> int:
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    eos = cfg.eos_token_id
    if eos is None:
        return 0  # never shown: without eos every row runs to max_new_tokens
    return eos if isinstance(eos, int) else list(eos)[0]
