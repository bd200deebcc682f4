"""SigLIP pairwise sigmoid loss, with the global batch spread over a ring of ranks.

Every rank keeps its own image features and passes text features around the ring, so it scores its
b_local images against all W * b_local texts one b_local x b_local block at a time; the gradient of
each visiting text block travels back around the ring to the rank that owns it. The block loss
recomputes its logits in backward instead of saving them, so no rank ever holds more than one block
(or one chunk_size x b_local slice of it) of logits, in forward or backward.
"""

from __future__ import annotations

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


class _SigmoidBlock(torch.autograd.Function):
    """-sum log sigmoid(y * z) over one block, in row chunks, recomputing the logits in backward."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, positive: bool, chunk_size: int):
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.positive, ctx.chunk_size = positive, chunk_size
        loss = img.new_zeros(())
        for row0 in range(0, img.shape[0], chunk_size):
            rows = img[row0 : row0 + chunk_size]
            loss -= F.logsigmoid(_signed_logits(rows, txt, scale, bias, row0, positive)).sum()
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        img, txt, scale, bias = ctx.saved_tensors
        need_img, need_txt = ctx.needs_input_grad[:2]
        grad_img = torch.empty_like(img) if need_img else None
        grad_txt = torch.zeros_like(txt) if need_txt else None
        grad_scale, grad_bias = img.new_zeros(()), img.new_zeros(())
        with torch.autocast(img.device.type, enabled=False):
            for row0 in range(0, img.shape[0], ctx.chunk_size):
                rows = img[row0 : row0 + ctx.chunk_size]
                # d(-log sigmoid(y z)) / dz = -y * sigmoid(-y z)
                g = _signed_logits(rows, txt, scale, bias, row0, ctx.positive).neg_().sigmoid_()
                if ctx.positive:
                    g.diagonal(offset=row0).neg_()
                g.mul_(grad_loss)
                g_txt = g @ txt
                if need_img:
                    grad_img[row0 : row0 + ctx.chunk_size] = g_txt * scale
                if need_txt:
                    grad_txt.addmm_(g.T, rows)
                grad_scale += (g_txt * rows).sum()
                grad_bias += g.sum()
        if need_txt:
            grad_txt.mul_(scale)
        return (
            grad_img,
            grad_txt,
            grad_scale.reshape(scale.shape),
            grad_bias.reshape(bias.shape),
            None,
            None,
        )


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


class _RingShift(torch.autograd.Function):
    """Take the left neighbour's tensor and give ours to the right; gradients go the other way.

    Each shift's backward needs the gradient of its output, which includes the next shift's
    backward, so every rank runs the backward shifts in the same (reverse) order and the sends and
    receives pair up without deadlock for any world size.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _shift(x, group, +1)

    @staticmethod
    def backward(ctx, grad):
        return _shift(grad, ctx.group, -1), None


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
        loss = _SigmoidBlock.apply(img, txt, scale, bias, True, chunk_size)
        for _ in range(_world_size(group) - 1):
            txt = _RingShift.apply(txt, group)
            loss = loss + _SigmoidBlock.apply(img, txt, scale, bias, False, chunk_size)
    # Normalisation: rank r returns L_r = -(1/b_local) * sum over its b_local x N rows of the
    # global N x N matrix (N = W * b_local) of log sigmoid(y z). The mean of the L_r over ranks is
    # exactly the single-process loss on the concatenated batch, -(1/N) * sum over all N x N
    # log sigmoid(y z) (big_vision / open_clip's per-example normalisation with batch size N); a
    # rank's own features collect the gradient of every L_r (W times that loss's gradient), and
    # DDP's 1/W average of parameter gradients then gives exactly that loss's gradient.
    return loss / b_local
