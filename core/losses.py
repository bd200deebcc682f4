"""SigLIP pairwise sigmoid loss, with the global batch spread over a ring of ranks; and the
pairwise preference losses of DPO and its variants (`dpo_loss`, at the end).

Every rank keeps its own image features and passes text features around the ring, so it scores its
b_local images against all W * b_local texts one b_local x b_local block at a time. Nothing that
arrives is kept for backward: backward sends the texts round the ring again, each with a gradient
buffer that collects every rank's d/dtext on the way and is delivered to the text's owner after the
last visit. Logits are recomputed in backward instead of saved. So a rank holds at most one block
(or one chunk_size x b_local slice of it) of logits and a few b_local x D buffers, in forward and
backward, whatever the world size (open_clip's SigLipLoss keeps every block's logits and every
visiting text block for backward: its memory grows with W).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _logits(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
    """scale * img @ txt.T + bias: the only place a logits tensor is created."""
    return (img @ txt.T).mul_(scale).add_(bias)


def _signed_logits(img, txt, scale, bias, row0: int, positive: bool) -> torch.Tensor:
    """y * z for rows row0.. of a block, with y = +1 on the global diagonal and -1 elsewhere."""
    yz = _logits(img, txt, scale, bias).neg_()
    if positive:
        yz.diagonal(offset=row0).neg_()
    return yz


def _block_loss(img, txt, scale, bias, positive: bool, chunk_size: int) -> torch.Tensor:
    """-sum log sigmoid(y * z) over one block, in row chunks."""
    loss = img.new_zeros(())
    for row0 in range(0, img.shape[0], chunk_size):
        rows = img[row0 : row0 + chunk_size]
        loss -= F.logsigmoid(_signed_logits(rows, txt, scale, bias, row0, positive)).sum()
    return loss


def _block_backward(img, txt, scale, bias, positive, chunk_size, grad_loss, acc, need_txt):
    """One block's gradients: adds d/dimg / scale, d/dscale, d/dbias into acc (in place) and
    returns d/dtxt (None unless need_txt). The logits are recomputed chunk by chunk."""
    grad_img, grad_scale, grad_bias = acc
    grad_txt = torch.zeros_like(txt) if need_txt else None
    for row0 in range(0, img.shape[0], chunk_size):
        rows = img[row0 : row0 + chunk_size]
        # d(-log sigmoid(y z)) / dz = -y * sigmoid(-y z)
        g = _signed_logits(rows, txt, scale, bias, row0, positive).neg_().sigmoid_()
        if positive:
            g.diagonal(offset=row0).neg_()
        g.mul_(grad_loss)
        g_txt = g @ txt
        if grad_img is not None:
            grad_img[row0 : row0 + chunk_size] += g_txt
        if need_txt:
            grad_txt.addmm_(g.T, rows)
        grad_scale += (g_txt * rows).sum()
        grad_bias += g.sum()
    if need_txt:
        grad_txt.mul_(scale)
    return grad_txt


def _shift(x: torch.Tensor, group, step: int) -> torch.Tensor:
    """Send x to group rank (rank + step) and return what rank (rank - step) sent here."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x, group=group, group_peer=(rank + step) % world),
        dist.P2POp(dist.irecv, out, group=group, group_peer=(rank - step) % world),
    ]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _RingSigmoidLoss(torch.autograd.Function):
    """This rank's images against its own texts (the positives) and then, shifted one rank along
    the ring at a time, every other rank's texts; saves only its own features for backward."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, group, world: int, chunk_size: int):
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.group, ctx.world, ctx.chunk_size = group, world, chunk_size
        loss = _block_loss(img, txt, scale, bias, True, chunk_size)
        visiting = txt
        for _ in range(world - 1):
            visiting = _shift(visiting, group, +1)  # after k shifts: the texts of rank r - k
            loss += _block_loss(img, visiting, scale, bias, False, chunk_size)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        img, txt, scale, bias = ctx.saved_tensors
        group, world, chunk = ctx.group, ctx.world, ctx.chunk_size
        need_img, need_txt = ctx.needs_input_grad[:2]
        acc = [torch.zeros_like(img) if need_img else None, img.new_zeros(()), img.new_zeros(())]
        with torch.autocast(img.device.type, enabled=False):
            grad_txt = _block_backward(img, txt, scale, bias, True, chunk, grad_loss, acc, need_txt)
            # The texts go round again in forward's order, each travelling with the gradient
            # it has collected: [texts, d/dtexts so far] in one message per hop. Every rank runs
            # the same hops in the same order with the same shapes (need_txt is the model's, the
            # same on every rank), so the sends and receives pair up for any world size.
            pair = txt[None]
            if need_txt and world > 1:
                pair = txt.new_zeros((2, *txt.shape))
                pair[0] = txt
            for _ in range(world - 1):
                pair = _shift(pair, group, +1)
                g = _block_backward(img, pair[0], scale, bias, False, chunk, grad_loss, acc,
                                    need_txt)  # fmt: skip
                if need_txt:
                    pair[1] += g
                del g  # before the next hop allocates its buffers
            if need_txt and world > 1:
                # After its last visit a text block is one rank left of its owner: send it home.
                grad_txt += _shift(pair[1], group, +1)
        grad_img, grad_scale, grad_bias = acc
        if need_img:
            grad_img.mul_(scale)
        return (
            grad_img,
            grad_txt,
            grad_scale.reshape(scale.shape),
            grad_bias.reshape(bias.shape),
            None,
            None,
            None,
        )


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    group=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """SigLIP loss of this rank's b_local images against the texts of every rank in `group`.

    image_features, text_features: L2-normalised [b_local, D], pair i of this rank on row i; every
    rank must have the same b_local. logit_scale is the log temperature, logit_bias the bias.
    chunk_size bounds the logits alive at once to chunk_size x b_local (default b_local x b_local).
    group=None means the default group when torch.distributed is initialised, else one process.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(f"{image_features.shape=} != {text_features.shape=}")
    b_local = image_features.shape[0]
    chunk_size = chunk_size or b_local
    # Logits and loss in fp32 (fp64 stays fp64) whatever the autocast dtype. Texts travel the
    # ring in that dtype too, so their gradients are accumulated over the ring without bf16 loss.
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    with torch.autocast(image_features.device.type, enabled=False):
        img, txt = image_features.to(dtype), text_features.to(dtype)
        scale, bias = logit_scale.to(dtype).exp(), logit_bias.to(dtype)
        loss = _RingSigmoidLoss.apply(img, txt, scale, bias, group, _world_size(group), chunk_size)
    # Normalisation: rank r returns L_r = -(1/b_local) * sum over its b_local x N rows of the
    # global N x N matrix (N = W * b_local) of log sigmoid(y z). The mean of the L_r over ranks is
    # exactly the single-process loss on the concatenated batch, -(1/N) * sum over all N x N
    # log sigmoid(y z) (big_vision / open_clip's per-example normalisation with batch size N); a
    # rank's own features collect the gradient of every L_r (W times that loss's gradient), and
    # DDP's 1/W average of parameter gradients then gives exactly that loss's gradient.
    return loss / b_local


# ------------------------------------------------------------------ preference (DPO) losses
DPO_KINDS = ("sigmoid", "robust", "hinge", "ipo")
_SMOOTHED_KINDS = ("sigmoid", "robust")  # the kinds label_smoothing applies to


class DPOLoss(NamedTuple):
    """Per-example losses [B] and the implicit rewards beta * (policy - reference) log-prob of
    the chosen and rejected responses [B] (detached: for logging and reward accuracy)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    kind: str,
    label_smoothing: float = 0.0,
) -> DPOLoss:
    """Pairwise preference loss of each example, as TRL's DPOTrainer defines it.

    Inputs are [B] log-probabilities of the chosen and rejected responses (completion tokens
    only) under the policy and the frozen reference. With the log-ratio margin
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected) and ls = log sigmoid:

    - "sigmoid" (DPO, Rafailov et al. 2023), with label_smoothing eps the conservative DPO of
      the cDPO note: -(1 - eps) ls(beta z) - eps ls(-beta z), the cross-entropy against the
      soft label 1 - eps (TRL <= 0.28; TRL >= 0.29 dropped eps from "sigmoid": the same at 0).
    - "robust" (Chowdhury et al. 2024, labels flipped with probability eps):
      (-(1 - eps) ls(beta z) + eps ls(-beta z)) / (1 - 2 eps), an unbiased estimate of the
      clean-label sigmoid loss: (1 - eps) L(z) + eps L(-z) = -ls(beta z).
    - "hinge" (SLiC, Zhao et al. 2023): relu(1 - beta z); 1 / beta is the margin.
    - "ipo" (Azar et al. 2023, eq. 17, tau = beta): (z - 1 / (2 beta))^2.

    Normalisation the caller supplies: "sigmoid", "robust" and "hinge" take sequence log-probs
    summed over the completion's tokens; "ipo" takes them averaged over the completion's tokens
    (sum / number of completion tokens, chosen and rejected each by their own length), as TRL
    does for IPO (the squared loss would otherwise grow with length; confirmed with the IPO
    authors, per TRL's comment). The rewards are then of whatever was supplied.

    label_smoothing must be in [0, 0.5) (at 0.5 the label says nothing and "robust" divides by
    zero); it applies to "sigmoid" and "robust" only: a non-zero value with "hinge" or "ipo" is an
    error here (TRL warns and ignores it). The reference log-probs are detached: the reference
    is a constant of the objective even when it shares weights with the policy (LoRA with the
    adapters off). Computed in fp32 at least (fp64 stays fp64).
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"unknown DPO loss kind {kind!r}; the kinds are {', '.join(DPO_KINDS)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), not {label_smoothing}")
    if label_smoothing and kind not in _SMOOTHED_KINDS:
        raise ValueError(
            f"label_smoothing applies to {' and '.join(_SMOOTHED_KINDS)} only, not {kind!r}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, not {beta}")
    inputs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if len({tuple(t.shape) for t in inputs}) != 1 or policy_chosen_logps.dim() != 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ValueError(f"the four log-prob tensors must all be [B], not {shapes}")
    # Sequence log-probs are sums of hundreds of terms whose difference is what matters: in
    # bf16 the margin would be mostly rounding.
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    rc, rr = ref_chosen_logps.detach().to(dtype), ref_rejected_logps.detach().to(dtype)
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    z = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if kind == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
    elif kind == "robust":
        clean, flipped = F.logsigmoid(beta * z), F.logsigmoid(-beta * z)
        losses = (-(1 - eps) * clean + eps * flipped) / (1 - 2 * eps)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * z)
    else:  # ipo
        losses = (z - 1 / (2 * beta)) ** 2
    return DPOLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())
