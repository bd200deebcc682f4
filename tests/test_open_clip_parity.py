"""vlscale's sigmoid loss equals open_clip's `SigLipLoss` on the same features: value and every
gradient, in one process and over gloo ranks with each of open_clip's exchange schemes.

open_clip's package __init__ imports torchvision (its image transforms), which this environment
cannot load beside the CPU torch, so loss.py (which imports only torch) is loaded by file path.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from core.losses import sigmoid_loss

B, D = 6, 16  # per-rank batch, feature size
TOL = dict(rtol=0.0, atol=1e-6)  # the bound, absolute, in fp32


def open_clip_loss_module():
    """open_clip/loss.py as a module, without running open_clip/__init__.py."""
    spec = importlib.util.find_spec("open_clip")  # locates the package, executes nothing
    if spec is None:
        pytest.skip("open_clip is not installed (pip install -e '.[eval]')")
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _features(n: int, seed: int = 0):
    """L2-normalised image/text features whose pairs are correlated (so both signs of y*z
    matter), a log temperature and a bias."""
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, D, generator=gen), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(n, D, generator=gen), dim=-1)
    return img, txt, torch.tensor(math.log(10.0)), torch.tensor(-5.0)


def _loss_and_grads(fn, tensors, frozen=()):
    """The loss and the gradient of each input (None for the indices in `frozen`)."""
    leaves = [t.detach().clone().requires_grad_(i not in frozen) for i, t in enumerate(tensors)]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _vlscale(chunk_size=None):
    return lambda img, txt, scale, bias: sigmoid_loss(img, txt, scale, bias, chunk_size=chunk_size)


def _open_clip(loss_module):
    # open_clip's model returns logit_scale.exp() and the loss takes it as given
    return lambda img, txt, scale, bias: loss_module(img, txt, scale.exp(), bias)


def _assert_same(ours, theirs):
    (loss, grads), (ref_loss, ref_grads) = ours, theirs
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name, grad, ref in zip(("image", "text", "scale", "bias"), grads, ref_grads, strict=True):
        if ref is None:  # a frozen input
            assert grad is None, name
            continue
        torch.testing.assert_close(grad, ref, **TOL, msg=lambda m, n=name: f"d/d{n}: {m}")


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_single_process_equals_open_clip(chunk_size):
    oc = open_clip_loss_module()
    inputs = _features(2 * B)
    theirs = _loss_and_grads(_open_clip(oc.SigLipLoss()), inputs)
    assert theirs[0].item() > 1.0  # a loss far from 0: the comparison is not trivially tight
    _assert_same(_loss_and_grads(_vlscale(chunk_size), inputs), theirs)


def test_parity_detects_a_wrong_bias():
    """The bound is tight enough to see a 1e-5 change of one input."""
    oc = open_clip_loss_module()
    img, txt, scale, bias = _features(B)
    theirs = _loss_and_grads(_open_clip(oc.SigLipLoss()), (img, txt, scale, bias))
    ours = _loss_and_grads(_vlscale(), (img, txt, scale, bias + 1e-5))
    with pytest.raises(AssertionError):
        _assert_same(ours, theirs)


IMPLS = ("bidir", "shift", "reduce", "gather")  # open_clip's dist_impl choices


def _worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        oc = open_clip_loss_module()
        img, txt, scale, bias = _features(world * B)  # the same global batch on every rank
        mine = slice(rank * B, (rank + 1) * B)
        local = (img[mine], txt[mine], scale, bias)
        # both towers trained, and a frozen text tower (texts need no gradient, images do)
        for frozen in ((), (1,)):
            ours = _loss_and_grads(_vlscale(), local, frozen)
            for impl in IMPLS:
                loss_fn = oc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)
                theirs = _loss_and_grads(_open_clip(loss_fn), local, frozen)
                try:
                    _assert_same(ours, theirs)  # this rank's loss and its features' gradients
                except AssertionError as err:
                    raise AssertionError(f"rank {rank}, {impl=}, {frozen=}: {err}") from None
        # Against one process on the whole batch: the mean of the ranks' losses is its loss, and
        # a rank's features get W x its gradient (DDP's mean over ranks then makes it exact).
        ours = _loss_and_grads(_vlscale(), local)
        full, full_grads = _loss_and_grads(_open_clip(oc.SigLipLoss()), (img, txt, scale, bias))
        total = ours[0].clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total / world, full, rtol=1e-6, atol=1e-6)
        for grad, ref in zip(ours[1][:2], full_grads[:2], strict=True):
            torch.testing.assert_close(grad, world * ref[mine], rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
    # Passed. torch.distributed.nn's autograd collectives (open_clip's reduce and gather) make
    # about 1 exit in 8 abort in the interpreter's teardown ("terminate called without an active
    # exception"), after everything here has finished: leave without that teardown.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_equals_open_clip(world):
    """Each rank's loss and gradients equal open_clip's SigLipLoss(rank, world_size) with every
    dist_impl: at 2 ranks bidir makes one one-way exchange, at 4 one two-way exchange plus one
    one-way (its remainder); shift is a one-way ring like ours; reduce and gather give every rank
    every text block (gather: the all-gather formulation)."""
    open_clip_loss_module()  # skip before spawning when open_clip is absent
    ctx = mp.start_processes(
        _worker, args=(world, _free_port()), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 90  # a deadlock fails the test instead of hanging it
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{world} ranks did not finish")


# ------------------------------------------------------------ benchmarks/siglip_vs_open_clip.py
@pytest.fixture
def bench():
    """The benchmark script as a module; the open_clip modules it loads leave with the test (a
    package registered without its __init__ must not answer a later `import open_clip`)."""
    before = set(sys.modules)
    yield _benchmark_module()
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("open_clip", "siglip_vs_open_clip"):
            del sys.modules[name]


def _benchmark_module():
    open_clip_loss_module()  # skip when open_clip is absent
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "siglip_vs_open_clip.py"
    spec = importlib.util.spec_from_file_location("siglip_vs_open_clip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_peak_bytes_of_a_known_allocation_pattern(bench):

    def allocate():
        a = torch.empty(2**20, dtype=torch.uint8)
        b = torch.empty(2 * 2**20, dtype=torch.uint8)  # a and b alive: the peak, 3 MiB
        del a
        c = torch.empty(2**19, dtype=torch.uint8)
        del b, c

    assert bench.peak_bytes(allocate) == 3 * 2**20


TINY = dict(width=32, layers=1, heads=2, image_size=16, patch_size=8, text_len=8, vocab=64,
            embed_dim=16, batch=4, steps=1, rounds=2, lr=1e-3, wd=0.1, warmup=1, mem_batch=64,
            chunk=16, total_steps=20)  # fmt: skip


def test_benchmark_runs_both_frameworks_on_one_rank(bench):
    """The speed part trains both models (open_clip's loaded without torchvision); the memory
    part measures both losses."""
    import argparse

    oc = bench.load_open_clip()
    args = argparse.Namespace(**TINY)
    speed = bench.part_speed(args, oc)
    assert speed["world"] == 1 and len(speed["vlscale_sps"]) == len(speed["open_clip_sps"]) == 2
    # the same towers: vision + projection equal up to the patch embedding's bias (vlscale's
    # ViT has one, open_clip's conv1 has none)
    vision = speed["params_vision"]
    assert vision["vlscale"] - vision["open_clip"] == TINY["width"]
    memory = bench.part_memory(args, oc)["peak_bytes"]
    # at 64 x 64 logits in 16-row chunks vlscale holds less than open_clip's whole block
    assert 0 < memory["vlscale_chunk16"] < memory["open_clip_bidir"]
