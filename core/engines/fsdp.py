"""FSDP2 engine: `fully_shard` per transformer block of each tower, then the root.

Parameters, gradients and optimizer state are sharded over a 1-D mesh of all ranks. A frozen
tower is one unit (one all-gather, no reduce-scatter). Checkpoints are DCP directories, which
load into any world size. Evaluation runs in an unsharded copy loaded with the full weights,
or, by default (eval.sharded), through the sharded task itself, every rank in lockstep.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch

from .. import lazy_tensors
from ..config import Config, ConfigError
from ..distributed import DistInfo
from ..lazy_tensors import LazyTensors
from ..optim import (
    build_optimizer,
    build_scheduler,
    group_hyperparameters,
    restore_hyperparameters,
)
from .base import Engine, check_loaded, without_rebuilt
from .wrap import (
    EvalCopy,
    all_true,
    ensure_process_group,
    lift_scalars,
    meta_copy,
    own_metrics,
    prepare,
    unlift_scalars,
)


class FSDPEngine(Engine):
    loads_into_shards = True  # read_into_shards
    shards_parameters = True

    def __init__(self, task: torch.nn.Module, cfg: Config, dist: DistInfo, lr: float, total: int):
        e = cfg.engine
        if e.offload == "optimizer":
            raise ConfigError(
                "engine.offload=optimizer: FSDP2 offloads parameters, gradients and optimizer "
                "state together; use engine.offload=optimizer+params (or kind=zero2/zero3)"
            )
        self.dist, self.cfg = dist, cfg
        ensure_process_group(dist.device)
        self.eval_copy = EvalCopy(meta_copy(task), dist.device)
        stand_ins = lazy_tensors.active()  # weights the build left to be read into the shards
        self.task = task if stand_ins else task.to(dist.device)
        self.scalar_names = lift_scalars(task)
        prepare(task, e)
        unread = {}
        if stand_ins:  # the stand-ins become meta tensors: fully_shard shards them unread
            unread = {n: t for n, t in [*task.named_parameters(), *task.named_buffers()]
                      if stand_ins.is_stand_in(t)}  # fmt: skip
            move_read_weights(task, dist.device, stand_ins)
        # FSDP2 and DCP (DTensor underneath) are imported where an fsdp job first needs them:
        # ~0.7 s of imports that every rank of a ddp or DeepSpeed job would pay for nothing.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        bf16 = e.precision == "bf16"
        kwargs = dict(
            mesh=mesh,
            reshard_after_forward=e.reshard_after_forward,
            # bf16 compute, fp32 gradient reduction and fp32 master weights
            mp_policy=MixedPrecisionPolicy(
                param_dtype=torch.bfloat16 if bf16 else None,
                reduce_dtype=torch.float32 if bf16 else None,
            ),
        )
        if e.offload == "optimizer+params":
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=dist.device.type == "cuda")
        for name, blocks in task.blocks().items():
            tower = task.get_submodule(name)
            if not any(p.requires_grad for p in tower.parameters()):
                fully_shard(tower, **kwargs)  # frozen: one unit
                continue
            for block in blocks:
                fully_shard(block, **kwargs)
        fully_shard(task, **kwargs)
        if unread:
            read_into_shards(task, unread, stand_ins, dist.device)
        own_metrics(task)
        self.params = [p for p in task.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(task, cfg.optim, lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total)
        # Training casts through the MixedPrecisionPolicy; autocast is for evaluation (the copy).
        self.autocast_dtype = torch.bfloat16 if bf16 else None

    def forward_backward(self, batch: dict, loss_scale: float, sync: bool):  # -> TaskOutput
        self.task.set_requires_gradient_sync(sync)
        out = self.task(batch)
        (out.loss * loss_scale).backward()
        return out

    def step(self, loss_is_finite: bool) -> tuple[float, bool]:
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        stepped = loss_is_finite and math.isfinite(grad_norm)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm, stepped

    @contextlib.contextmanager
    def sharded_model(self):
        """The task, sharded, for evaluation in lockstep. Evaluators call its methods (encode,
        generate, ...), not only forward: the root's own parameters (embeddings, norms, heads:
        those outside the sharded blocks) stay gathered for the whole evaluation, each block is
        gathered by its own hooks while it runs and freed after (engine.reshard_after_forward)."""
        from torch.distributed.fsdp import FSDPModule

        root = self.task
        # FSDP2 learns which module is the root in its first forward; a job that resumed at
        # its last step evaluates before any (calling a block first would make it the root).
        root._get_fsdp_state()._lazy_init()
        root.set_reshard_after_forward(False, recurse=False)
        root.unshard()
        try:
            yield root
        finally:
            root.set_reshard_after_forward(self.cfg.engine.reshard_after_forward, recurse=False)
            for module in root.modules():  # blocks kept gathered (reshard_after_forward false)
                if isinstance(module, FSDPModule):
                    module.reshard()

    # ---------------------------------------------------------------- checkpoints
    # DCP: every rank writes its shards; loading reshards to the current world size.

    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.task, self.optimizer)
        model_sd = without_rebuilt(model_sd, self.task)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory / "dcp")
        if self.dist.is_main:
            torch.save({"scheduler": self.scheduler.state_dict()}, directory / "scheduler.pt")

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_state_dict,
        )

        model_sd, optim_sd = get_state_dict(self.task, self.optimizer)
        # The rebuilt weights are not in the checkpoint: they keep their built values.
        state = {"model": without_rebuilt(model_sd, self.task), "optim": optim_sd}
        dcp.load(state, checkpoint_id=directory / "dcp")
        hyper = group_hyperparameters(self.optimizer)  # this run's config's
        result = set_state_dict(
            self.task,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=not self.task.rebuilt_prefixes()),
        )
        check_loaded(result, self.task, directory)
        restore_hyperparameters(self.optimizer, hyper)
        self.load_scheduler(torch.load(directory / "scheduler.pt", weights_only=True)["scheduler"])

    can_reshard = True  # DCP loads into any world size

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors on every rank (collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True)
        return unlift_scalars(get_model_state_dict(self.task, options=options), self.scalar_names)

    def parameters_finite(self) -> bool:
        local = all(
            bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
            for p in self.task.parameters()
        )
        return all_true(local, self.dist.device)

    # ---------------------------------------------------------------- formats (no instance)

    # The engine.offload values FSDP2 supports: CPUOffloadPolicy moves parameters, gradients
    # and optimizer state together.
    offloads: tuple[str, ...] = ("none", "optimizer+params")

    @staticmethod
    def read_checkpoint(step_dir: Path) -> LazyTensors:
        """The full fp32 model state of one checkpoint directory, offline in one process: the
        "model" entries of its DCP directory, read without a process group one tensor at a time
        (DCP reads the pieces of the requested tensor alone)."""
        import torch.distributed.checkpoint as dcp

        reader = dcp.FileSystemReader(str(step_dir / "dcp"))
        metas = {
            key[len("model.") :]: torch.empty(info.size, dtype=info.properties.dtype, device="meta")
            for key, info in reader.read_metadata().state_dict_metadata.items()
            if key.startswith("model.")
        }

        def read(key: str) -> torch.Tensor:
            wanted = {"model": {key: torch.empty_like(metas[key], device="cpu")}}
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(wanted, storage_reader=dcp.FileSystemReader(str(step_dir / "dcp")),
                         no_dist=True)  # fmt: skip
            return wanted["model"][key]

        return LazyTensors(metas, read)

    @staticmethod
    def memory_per_rank(offload: str, precision: str, n: int, t: int, w: int) -> dict:
        """Bytes per rank of parameters, gradients and optimizer state (N parameters, T
        trained, W ranks; the same in fp32 and bf16):
          params 4N/W (fp32 shards; bf16 gathered per block while it runs)  grads 4T/W
          optimizer 8T/W (AdamW m, v)
        offload=optimizer+params (CPUOffloadPolicy) moves all three to CPU: 0 on the GPU."""
        out = {"params": 4 * n / w, "grads": 4 * t / w, "optimizer": 8 * t / w}
        if offload == "optimizer+params":
            out = dict.fromkeys(out, 0)
        if offload != "none":
            out["optimizer"] = 0
        return {k: int(v) for k, v in out.items()}


def move_read_weights(task: torch.nn.Module, device: torch.device, stand_ins) -> None:
    """The weights the build read (small parts) to the device; each stand-in becomes a meta
    parameter or buffer (FSDP2 shards meta parameters as they are and leaves meta buffers; a
    tied weight stays tied), to be filled by read_into_shards."""
    metas: dict[int, torch.nn.Parameter] = {}
    for module in task.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if stand_ins.is_stand_in(param):
                if id(param) not in metas:
                    meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
                    metas[id(param)] = torch.nn.Parameter(meta, param.requires_grad)
                module.register_parameter(name, metas[id(param)])
            else:
                param.data = param.data.to(device)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if stand_ins.is_stand_in(buffer):
                module._buffers[name] = torch.empty_like(buffer, device="meta")
            else:
                module._buffers[name] = buffer.to(device)


def read_into_shards(task: torch.nn.Module, unread: dict, stand_ins, device) -> None:
    """Give each rank's shard of the weights the build left unread (`unread`: name -> the
    stand-in it was) its values: the rows this rank holds (dimension 0, DTensor's even split, as
    FSDP2 shards), read alone from safetensors checkpoints; a buffer whole (they are small and
    replicated). A rank holds its shards and one piece at a time, never another rank's rows
    (random initialisation is replayed, core/deferred_init.py: read in the order it completes
    tensors). Loaded with assign=True, after which FSDP2 re-pads its shards (its
    load_state_dict post-hook). A non-finite value was computed at build time from a stand-in's
    placeholder: refused, it would train on garbage."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    aliases = lazy_tensors.tied_names(task)  # a tied weight: one parameter, several names
    shards = {}
    buffers = dict(task.named_buffers())
    for name in sorted(unread, key=lambda n: stand_ins.order(unread[n])):
        stand_in = unread[name]
        if name in buffers:
            owner, _, attr = name.rpartition(".")
            module = task.get_submodule(owner)
            module._buffers[attr] = stand_ins.value(stand_in).to(device)
            continue
        param = task.get_parameter(name)
        mesh, placements = param.device_mesh, param.placements
        shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
        if shape[0]:
            rows = stand_ins.rows(stand_in.reshape(param.shape), offset[0], offset[0] + shape[0])
        else:  # more ranks than rows: this one holds none
            rows = torch.empty(shape)
        local = rows.reshape(shape).to(device=mesh.device_type, dtype=param.dtype)
        if not torch.isfinite(local).all():
            raise RuntimeError(
                f"{name}: read into shards as non-finite values: code that ran while the task "
                "was built computed from a checkpoint weight before it was read (call "
                "core.lazy_tensors.materialize(module) there first)"
            )
        shards[name] = DTensor.from_local(local, mesh, placements, run_check=False,
                                          shape=param.shape, stride=param.stride())  # fmt: skip
    task.load_state_dict(shards, strict=False, assign=True)
    for names in aliases:  # assign set the first name only: tie the others again
        if names[0] in shards:
            for other in names[1:]:
                lazy_tensors.set_parameter(task, other, task.get_parameter(names[0]))
