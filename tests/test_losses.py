import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from core import losses
from core.losses import sigmoid_loss

B, D = 5, 8  # per-rank batch and feature size; chunk 2 leaves a ragged last chunk


def _reference(img, txt, logit_scale, logit_bias):
    """The single-process loss on the full matrix with plain autograd."""
    logits = logit_scale.exp() * img @ txt.T + logit_bias
    labels = 2 * torch.eye(len(img), dtype=img.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(img)


def _inputs(n, d=D, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=-1)
    txt = F.normalize(img + torch.randn(n, d, generator=gen, dtype=dtype), dim=-1)
    logit_scale = torch.tensor(math.log(10.0), dtype=dtype)
    logit_bias = torch.tensor(-10.0, dtype=dtype)
    return img, txt, logit_scale, logit_bias


def _grads(fn, tensors, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves, **kwargs)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _record_logit_shapes(shapes):
    real = losses._logits

    def recording(img, txt, scale, bias):
        out = real(img, txt, scale, bias)
        shapes.append(tuple(out.shape))
        return out

    return recording


def test_hand_computed_2x2():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    # logits = 2 * img @ txt.T - 1 = [[0.2, 1.0], [0.6, -1.0]]; -log sigmoid(x) = log(1 + e^-x)
    expected = (
        math.log1p(math.exp(-0.2))  # (0, 0) positive
        + math.log1p(math.exp(1.0))  # (0, 1) negative
        + math.log1p(math.exp(0.6))  # (1, 0) negative
        + math.log1p(math.exp(1.0))  # (1, 1) positive
    ) / 2
    loss = sigmoid_loss(img, txt, torch.tensor(math.log(2.0)), torch.tensor(-1.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # d/d(bias) = (1/b) * sum(-y * sigmoid(-y z))
    bias = torch.tensor(-1.0, requires_grad=True)
    sigmoid_loss(img, txt, torch.tensor(math.log(2.0)), bias).backward()
    z = [[0.2, 1.0], [0.6, -1.0]]
    sig = [[1 / (1 + math.exp(-x)) for x in row] for row in z]
    expected_bias_grad = (-(1 - sig[0][0]) + sig[0][1] + sig[1][0] - (1 - sig[1][1])) / 2
    assert bias.grad.item() == pytest.approx(expected_bias_grad, rel=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 2, 1])
def test_single_process_matches_reference(chunk_size):
    inputs = _inputs(3 * B)
    ref_loss, ref_grads = _grads(_reference, inputs)
    loss, grads = _grads(sigmoid_loss, inputs, chunk_size=chunk_size)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)


def test_custom_backward_gradcheck():
    inputs = [t.requires_grad_() for t in _inputs(4, d=3, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *t: sigmoid_loss(*t, chunk_size=3), inputs)


def test_bf16_autocast_computes_in_fp32():
    img, txt, logit_scale, logit_bias = _inputs(B)
    img, txt = img.bfloat16().requires_grad_(), txt.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sigmoid_loss(img, txt, logit_scale, logit_bias)
    loss.backward()
    assert loss.dtype == torch.float32 and img.grad.dtype == torch.bfloat16
    expected = _reference(img.detach().float(), txt.detach().float(), logit_scale, logit_bias)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_no_logits_saved_for_backward():
    inputs = [t.requires_grad_() for t in _inputs(B, d=D)]
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sigmoid_loss(*inputs, chunk_size=2)
    shapes = []
    losses._logits, real = _record_logit_shapes(shapes), losses._logits
    try:
        loss.backward()
    finally:
        losses._logits = real
    assert set(saved) <= {(B, D), ()}  # features and scalars only
    assert set(shapes) == {(2, B), (1, B)}


def _distributed_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=20))
    try:
        inputs = _inputs(world * B)  # the same global batch on every rank
        ref_loss, ref_grads = _grads(_reference, inputs)
        mine = slice(rank * B, (rank + 1) * B)
        img, txt, logit_scale, logit_bias = inputs
        local = (img[mine], txt[mine], logit_scale, logit_bias)
        for chunk_size in (None, 2):
            shapes = []
            losses._logits = _record_logit_shapes(shapes)
            loss, grads = _grads(sigmoid_loss, local, chunk_size=chunk_size)
            assert set(shapes) == ({(B, B)} if chunk_size is None else {(2, B), (1, B)})
            # DDP averages over ranks: the mean loss and mean scale/bias gradients are the
            # reference ones, and a rank's own features collect W x the reference gradient.
            mean_loss = loss.clone()
            dist.all_reduce(mean_loss)
            torch.testing.assert_close(mean_loss / world, ref_loss, rtol=1e-5, atol=1e-6)
            for grad, ref in zip(grads[:2], ref_grads[:2], strict=True):
                torch.testing.assert_close(grad, world * ref[mine], rtol=1e-5, atol=1e-6)
            for grad, ref in zip(grads[2:], ref_grads[2:], strict=True):
                dist.all_reduce(grad)
                torch.testing.assert_close(grad / world, ref, rtol=1e-5, atol=1e-6)
        # Memory flat in the world size: of the texts that come round the ring none is kept for
        # backward, only this rank's own two feature blocks (and scalars).
        saved = []
        leaves = [t.clone().requires_grad_() for t in local]
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.shape) or t, lambda t: t
        ):
            loss = sigmoid_loss(*leaves)
        loss.backward()
        assert sorted(map(tuple, saved)) == [()] * (len(saved) - 2) + [(B, D)] * 2, saved
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_matches_single_process(world):
    ctx = mp.start_processes(
        _distributed_worker,
        args=(world, _free_port()),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 60  # a deadlock fails the test instead of hanging it
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"distributed sigmoid_loss with {world} ranks did not finish")
