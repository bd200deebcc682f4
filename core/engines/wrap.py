"""What every engine applies to the single-device task from outside the model code, in this
order (torchtitan's): activation checkpointing, compile. Sharding comes after, in the engine.
All of it works on the blocks the task declares (`Task.blocks()`, core/tasks/base.py); which
parameters train was decided when the task was built (its trainable patterns).
"""

from __future__ import annotations

import copy
import datetime
import functools
import os
import socket

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, EngineConfig


def _checkpointed_forward(forward, *args, **kwargs):
    # Non-reentrant: works with frozen inputs, kwargs, FSDP2 and ZeRO-3 hooks.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(
    blocks: dict[str, nn.ModuleList], mode: str, every_k: int = 2
) -> int:
    """Recompute blocks in backward instead of keeping their activations. The block's `forward`
    is replaced on the instance, so parameter names (checkpoints, sharding) do not change.
    Returns the number of blocks checkpointed."""
    if mode == "none":
        return 0
    if mode == "every_k" and every_k < 1:
        raise ConfigError(f"engine.ac_every_k must be >= 1, got {every_k}")
    count = 0
    for tower in blocks.values():
        for i, block in enumerate(tower):
            if mode == "full" or i % every_k == 0:
                block.forward = functools.partial(_checkpointed_forward, block.forward)
                count += 1
    return count


def apply_compile(blocks: dict[str, nn.ModuleList]) -> int:
    """torch.compile each block (its own graph: repeated blocks reuse one compilation)."""
    count = 0
    for tower in blocks.values():
        for block in tower:
            block.compile()
            count += 1
    return count


def prepare(task, cfg: EngineConfig) -> None:
    """Activation checkpointing and compile of the task's declared blocks."""
    blocks = task.blocks()
    apply_activation_checkpointing(blocks, cfg.activation_checkpointing, cfg.ac_every_k)
    if cfg.compile:
        apply_compile(blocks)


def lift_scalars(model: nn.Module) -> list[str]:
    """0-d parameters (e.g. a logit scale) become 1-element 1-d ones: neither FSDP2 nor ZeRO-3
    shards scalars. Broadcasting keeps the maths identical; returns their names."""
    names = []
    for name, param in model.named_parameters():
        if param.ndim == 0:
            param.data = param.data.reshape(1)
            names.append(name)
    return names


def unlift_scalars(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """A state dict with the lifted parameters back in their model-code shape."""
    for name in names:
        if name in state:
            state[name] = state[name].reshape(())
    return state


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device (no memory).
    Sharded engines evaluate in it, after loading the consolidated weights."""
    memo = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (
            nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
        )
    return copy.deepcopy(model, memo)


class EvalCopy:
    """Context manager: the meta copy given the full weights, freed again on exit. The gathered
    tensors become its parameters (load_state_dict assign=True): one full copy on each rank
    during evaluation, not two (allocating the copy, then copying the gathered state into it)."""

    def __init__(self, shell: nn.Module, device: torch.device):
        self.shell, self.device = shell, device

    def __call__(self, state: dict[str, torch.Tensor]):
        self.state = state
        return self

    def __enter__(self) -> nn.Module:
        state = {k: v.to(self.device) for k, v in self.state.items()}
        del self.state
        self.shell.load_state_dict(state, assign=True)
        return self.shell

    def __exit__(self, *exc) -> None:
        self.shell.to("meta")


def ensure_process_group(device: torch.device) -> None:
    """Sharded engines need a process group even on one rank, which init_distributed does not
    make (plain `python`, or torchrun with one process)."""
    if tdist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=30)
    # Bound to this rank's GPU, as init_distributed's groups are (without it every barrier on the
    # H200 warned that it guessed the device).
    device_id = device if device.type == "cuda" else None
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun with one process: its agent serves the rendezvous store on MASTER_PORT and
        # tells workers to join it as clients (TORCHELASTIC_USE_AGENT_STORE); a store of our own
        # on a fresh port would wait forever for a server that never comes.
        tdist.init_process_group(
            backend, init_method="env://", timeout=timeout, device_id=device_id
        )
        return
    with socket.socket() as s:  # a free port for the single-rank rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    tdist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout,
        device_id=device_id,
    )  # fmt: skip


def own_metrics(model: nn.Module) -> None:
    """Make the tensors in the output's "metrics" copies: a metric may view a parameter (a logit
    scale), whose storage FSDP2 and ZeRO-3 free in their own post-forward hooks, so this hook
    is put before theirs. A device copy, no host sync."""

    def hook(module, args, out):  # out: a TaskOutput
        if out.metrics:
            metrics = {k: v.detach().clone() if torch.is_tensor(v) else v
                       for k, v in out.metrics.items()}  # fmt: skip
            return out._replace(metrics=metrics)
        return out

    model.register_forward_hook(hook, prepend=True)


def all_true(flag: bool, device: torch.device) -> bool:
    """True on every rank iff `flag` is true on every rank."""
    if not tdist.is_initialized():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    tdist.all_reduce(t)
    return t.item() == 0.0
