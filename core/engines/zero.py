"""DeepSpeed ZeRO-2 / ZeRO-3 engine (kind zero2 | zero3: Zero2Engine | Zero3Engine, one
DeepSpeedEngine apart from their stage, offloads and memory; optional CPU offload).

The DeepSpeed config is generated from the run config on top of ds_configs/*.json, or taken from
the user's JSON (engine.ds_config) and checked: batch sizes, accumulation, clipping, precision
and gradient dtypes always agree with the run config, and no "auto" is left. The optimizer and
schedule are the same AdamW and warmup+cosine as every other engine (no DeepSpeed
"optimizer"/"scheduler" sections).

Numerics in bf16 (as fsdp's): bf16 weights and compute, fp32 master weights and AdamW state, and
gradients reduced and accumulated in fp32 (`communication_data_type`, `data_types.
grad_accum_dtype`; DeepSpeed's own default is bf16 for both). Evaluation runs a full copy holding
the fp32 master weights, the very values `read_checkpoint` gives, under bf16 autocast.

Step semantics: the loop already scales each micro-step's loss by 1/accum, so DeepSpeed's own
scaling by gradient_accumulation_steps is turned off, and the accumulation boundary is set
explicitly from `sync`. A step is skipped when the loss was not finite on any rank (the gate on
the wrapped optimizer) or the global gradient norm is not (DeepSpeed's overflow check); the
schedule advances either way, like the DDP engine's.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .. import lazy_tensors
from ..config import Config, ConfigError
from ..distributed import DistInfo, barrier
from ..lazy_tensors import LazyTensors, as_meta
from ..optim import (
    build_scheduler,
    group_hyperparameters,
    optimizer_groups,
    restore_hyperparameters,
)
from .base import Engine
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

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
TAG = "ds"  # the DeepSpeed checkpoint tag inside each step directory
# From engine.reshard_after_forward (build_ds_config):
REUSE_DISTANCE = "zero_optimization.stage3_max_reuse_distance"
PREFETCH = "zero_optimization.stage3_prefetch_bucket_size"
FROZEN_FILE = "frozen.safetensors"  # frozen weights DeepSpeed left out (see DeepSpeedEngine.save)


def base_config_name(kind: str, offload: str) -> str:
    if kind == "zero2":
        if offload == "optimizer+params":
            raise ConfigError("engine.offload=optimizer+params needs kind=zero3 (ZeRO-2 keeps "
                              "full parameters on every rank); use offload=optimizer")  # fmt: skip
        return "zero2.json"
    return "zero3_offload.json" if offload == "optimizer+params" else "zero3.json"


def expected_values(cfg: Config, world_size: int) -> dict[str, object]:
    """Dotted DeepSpeed keys whose values the run config decides."""
    e, o = cfg.engine, cfg.optim
    offload_opt = e.offload in ("optimizer", "optimizer+params")
    return {
        "train_batch_size": cfg.data.batch_size * o.accum_steps * world_size,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": o.accum_steps,
        "gradient_clipping": float(o.grad_clip),
        "bf16.enabled": e.precision == "bf16",
        "fp16.enabled": False,
        "zero_optimization.stage": 2 if e.kind == "zero2" else 3,
        "zero_optimization.offload_optimizer.device": "cpu" if offload_opt else "none",
        "zero_optimization.offload_param.device": (
            "cpu" if e.offload == "optimizer+params" else "none"
        ),
        # Gradients are reduced and accumulated in fp32 in bf16 runs too, as under ddp and fsdp
        # (DeepSpeed's defaults follow the model dtype: bf16); see `DEFAULT_FP32`.
        "communication_data_type": "fp32",
        "data_types.grad_accum_dtype": "fp32",
    }


# The keys above that DeepSpeed would otherwise default to bf16 in a bf16 run. A user's JSON may
# set `communication_data_type` to "bf16" in a bf16 run (a deliberate trade: half the gradient
# traffic, the sum of the ranks' gradients rounded to bf16, no parity with ddp/fsdp); any other
# value, and a bf16 `grad_accum_dtype` (rounding compounds over micro-steps), is refused.
DEFAULT_FP32 = ("communication_data_type", "data_types.grad_accum_dtype")
_DTYPES = {"fp32": ("fp32", "float32", "float", "torch.float32"),
           "bf16": ("bf16", "bfloat16", "torch.bfloat16"),
           "fp16": ("fp16", "float16", "half", "torch.float16")}  # fmt: skip


def _dtype_name(value) -> object:
    """DeepSpeed's spellings of a dtype (runtime/config.py DtypeEnum) as fp32 | bf16 | fp16."""
    if isinstance(value, str):
        for name, spellings in _DTYPES.items():
            if value.lower() in spellings:
                return name
    return value


_ABSENT = object()


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _same(a, b) -> bool:
    if isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _autos(tree, prefix="") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if tree == "auto" else []


def build_ds_config(cfg: Config, world_size: int, cuda: bool = False) -> dict:
    """The DeepSpeed config of this run: a ds_configs/ base (or the user's JSON) with every value
    the run config decides filled in; a user value that disagrees is a ConfigError."""
    e = cfg.engine
    base_name = base_config_name(e.kind, e.offload)
    user = bool(e.ds_config)
    source = Path(e.ds_config) if user else DS_CONFIGS / base_name
    try:
        ds = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"engine.ds_config: cannot read {source}: {err}") from None
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"{source}: remove the '{section}' section: the optimizer and schedule come from "
                "the run config's optim section (the same AdamW and warmup+cosine as every engine)"
            )
    expected = expected_values(cfg, world_size)
    mismatches = []
    for key, want in expected.items():
        have = _get(ds, key)
        if key.endswith("offload_optimizer.device") or key.endswith("offload_param.device"):
            if have in (_ABSENT, "auto") and want == "none":
                continue  # no offload section: nothing to fill
            if have in (_ABSENT, "auto"):
                _set(ds, key, want)
                _set(ds, key.rsplit(".", 1)[0] + ".pin_memory", cuda)
                continue
        if have is _ABSENT or have == "auto":
            if key == "fp16.enabled":
                continue
            _set(ds, key, want)
        elif key in DEFAULT_FP32:
            have = _dtype_name(have)
            deliberate = key == "communication_data_type" and e.precision == "bf16"
            if have != want and not (deliberate and have == "bf16"):
                allowed = " (or 'bf16' in a bf16 run)" if deliberate else ""
                mismatches.append(
                    f"{key}={have!r} but gradients are reduced and accumulated in {want!r}"
                    f"{allowed}, as under ddp and fsdp"
                )
        elif not _same(have, want):
            mismatches.append(f"{key}={have!r} but the run config implies {want!r}")
    if mismatches:
        raise ConfigError(
            f"{source} disagrees with the run config (engine.kind={e.kind}, "
            f"engine.offload={e.offload}, engine.precision={e.precision}, data.batch_size, "
            f"optim.accum_steps, optim.grad_clip, {world_size} ranks): " + "; ".join(mismatches)
        )
    if e.kind == "zero3":
        # engine.reshard_after_forward, as under fsdp: a block's gathered weights are freed after
        # its forward and gathered again for its backward. DeepSpeed's defaults (false here)
        # keep every weight used again within 1e9 parameters and prefetch 5e7, and it does not
        # free a weight its prefetch has marked for a later use: a model under those sizes
        # stayed whole on every rank from its forward to its backward (tests/test_engines.py:
        # 63 of 65 weights gathered after the forward; still 58,528 of its 58,562 parameters
        # with the reuse distance 0 and one block's prefetch). Without prefetch none stays;
        # gathers no longer overlap compute on a GPU (BENCHMARKS.md).
        reshard = e.reshard_after_forward
        for key, value in ((REUSE_DISTANCE, 0 if reshard else 1_000_000_000),
                           (PREFETCH, 0 if reshard else 50_000_000)):  # fmt: skip
            if _get(ds, key) in (_ABSENT, "auto"):  # a user's number is the finer knob: kept
                _set(ds, key, value)
    left = _autos(ds)
    if left:
        raise ConfigError(f"{source}: unresolved 'auto' for {', '.join(left)}")
    if e.offload != "none":
        ds["zero_force_ds_cpu_optimizer"] = False  # the shared torch AdamW, on CPU
    ds["zero_allow_untested_optimizer"] = True  # _GatedAdamW is torch's AdamW
    return ds


class _GatedAdamW(torch.optim.AdamW):
    """AdamW whose step can be vetoed: DeepSpeed calls it inside its own step, after the
    overflow check, so a non-finite *loss* (with finite gradients) is skipped here."""

    skip = False

    def step(self, closure=None):
        if self.skip:
            return None
        return super().step(closure)


class DeepSpeedEngine(Engine):
    def __init__(self, task: torch.nn.Module, cfg: Config, dist: DistInfo, lr: float, total: int):
        cuda = dist.device.type == "cuda"
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.ds_config = build_ds_config(cfg, dist.world_size, cuda)
        self.dist, self.cfg = dist, cfg
        self.stage = self.ds_config["zero_optimization"]["stage"]
        ensure_process_group(dist.device)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        self.eval_copy = EvalCopy(meta_copy(task), dist.device)
        # ZeRO-3 under loop.building_for: weights the build left as stand-ins (checkpoint
        # weights, replayed random initialisation) are partitioned as each is read.
        stand_ins = lazy_tensors.active() if self.stage == 3 else None
        self.task = task if stand_ins else task.to(dist.device)
        self.scalar_names = lift_scalars(task)
        prepare(task, cfg.engine)
        o = cfg.optim
        # Before partitioning: the groups look at each parameter's shape (a partitioned one's
        # data is empty).
        groups = [g for g in optimizer_groups(task, o, lr) if g["params"]]  # as ddp's, less empties
        self.base_optimizer = _GatedAdamW(
            groups, lr=lr, betas=tuple(o.betas), eps=o.eps, foreach=True
        )
        # DeepSpeed casts the weights to bf16 and builds its fp32 masters from those: keep the
        # fp32 values to start the masters from them, as fsdp and ddp do. Built whole: references,
        # no copy, but held through initialize beside the bf16 copies (+2 bytes per trained
        # parameter); partitioned while read: this rank's partition of each, copied.
        bf16 = self.ds_config["bf16"]["enabled"] is True
        if stand_ins:
            initial = partition_while_reading(task, stand_ins, self.ds_config, dist, bf16)
        else:
            initial = [(p, p.data, 0) for p in task.parameters() if p.requires_grad and bf16]
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=task, optimizer=self.base_optimizer, config=copy.deepcopy(self.ds_config)
        )
        set_fp32_masters(initial, dist.rank if self.stage == 3 else None)
        del initial
        own_metrics(task)
        # The schedule drives the groups DeepSpeed steps (the same dicts, params swapped).
        self.scheduler = build_scheduler(self.base_optimizer, cfg.optim, total)
        self.bf16 = cfg.engine.precision == "bf16"
        # Training runs DeepSpeed's bf16 weights; autocast is for evaluation (the fp32 copy).
        self.autocast_dtype = torch.bfloat16 if self.bf16 else None

    @property
    def shards_parameters(self) -> bool:
        return self.stage == 3

    @contextlib.contextmanager
    def sharded_model(self):
        """The task itself: ZeRO-3's hooks gather each module's parameters while it runs,
        whichever method of the task calls it. Every module is marked as in a forward, as
        DeepSpeed's own forward marks them: a parameter read by a module other than its owner
        (the vision tower's position table, which its parent reads without calling the
        Embedding that owns it) is then gathered and registered as that module's external
        parameter, as in training's first forward. Unmarked, a job that had run no training
        forward (resumed at its last step; `vlscale eval`) read the partition's 0 elements
        ("cannot reshape tensor of 0 elements")."""
        from deepspeed.runtime.zero.parameter_offload import (
            ZeROOrderedDict,
            ensure_zero_ordered_dict,
        )

        modules = list(self.task.modules())
        for module in modules:
            ensure_zero_ordered_dict(module)
            module._parameters._in_forward = True
        try:
            yield self.task
        finally:
            for module in modules:
                if isinstance(module._parameters, ZeROOrderedDict):
                    module._parameters._in_forward = False

    def forward_backward(self, batch: dict, loss_scale: float, sync: bool):  # -> TaskOutput
        if self.bf16:  # the model's weights are bf16: so are its floating inputs
            batch = {
                k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in batch.items()
            }
        self.model.set_gradient_accumulation_boundary(sync)
        out = self.model(batch)
        self.model.backward(out.loss * loss_scale, scale_wrt_gas=False)
        return out

    def step(self, loss_is_finite: bool) -> tuple[float, bool]:
        self.base_optimizer.skip = not loss_is_finite
        self.model.step()
        self.base_optimizer.skip = False
        norm = self.model.get_global_grad_norm()
        grad_norm = math.nan if norm is None else float(norm)
        stepped = loss_is_finite and math.isfinite(grad_norm)
        self.scheduler.step()
        return grad_norm, stepped

    # ---------------------------------------------------------------- checkpoints

    # A task's rebuilt weights (Task.rebuilt_prefixes) stay out of checkpoints. DeepSpeed can
    # only leave out every frozen parameter (exclude_frozen_parameters): the other frozen ones
    # (e.g. stage 4's vision tower) are then written by us, to FROZEN_FILE.

    def save(self, directory: Path) -> None:
        rebuilt = bool(self.task.rebuilt_prefixes())
        self.model.save_checkpoint(
            str(directory),
            tag=TAG,
            client_state={"scheduler": self.scheduler.state_dict()},
            save_latest=False,
            exclude_frozen_parameters=rebuilt,
        )
        if rebuilt:
            self._save_frozen(directory / FROZEN_FILE)

    def _kept_frozen(self) -> list[tuple[str, torch.nn.Parameter]]:
        prefixes = self.task.rebuilt_prefixes()
        return [(name, p) for name, p in self.task.named_parameters()
                if not p.requires_grad and not name.startswith(prefixes)]  # fmt: skip

    def _gathered(self, param: torch.nn.Parameter, modifier_rank: int | None):
        """ZeRO-3: the full parameter inside the context (one at a time: no rank holds more)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=modifier_rank)

    def _save_frozen(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, param in self._kept_frozen():  # module order: the same collectives everywhere
            with self._gathered(param, None):
                if self.dist.is_main:
                    tensors[name] = param.detach().cpu().clone()
        if self.dist.is_main:
            save_file(tensors, path)

    def _load_frozen(self, path: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(path)
        for name, param in self._kept_frozen():
            with self._gathered(param, 0), torch.no_grad():
                if self.stage != 3 or self.dist.is_main:  # ZeRO-3: rank 0's copy is scattered
                    param.copy_(tensors[name].to(param.dtype))

    def load(self, directory: Path, universal: bool = False, frozen_from: Path | None = None):
        hyper = group_hyperparameters(self.base_optimizer)  # this run's config's
        self.model._config.load_universal_checkpoint = universal
        rebuilt = bool(self.task.rebuilt_prefixes())
        _, client = self.model.load_checkpoint(
            str(directory), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False,
            load_module_strict=not rebuilt,
        )  # fmt: skip
        if client is None:
            raise RuntimeError(f"{directory}: no DeepSpeed checkpoint under tag {TAG!r}")
        if rebuilt:
            self._load_frozen((frozen_from or directory) / FROZEN_FILE)
        if universal:
            repair_universal_load(self.base_optimizer, hyper)
        else:
            restore_hyperparameters(self.base_optimizer, hyper)
        self.load_scheduler(client["scheduler"])

    can_reshard = True  # through a universal checkpoint, see `load_resharded`

    def load_resharded(self, directory: Path) -> None:
        """Load a checkpoint written by another number of ranks: convert it to DeepSpeed's
        universal format once (rank 0, beside the original), then load that."""
        universal = directory / "universal"
        if self.dist.is_main and not (universal / TAG / "zero").is_dir():
            to_universal(directory, universal, self.stage)
        barrier()
        self.load(universal, universal=True, frozen_from=directory)  # with the schedule

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors on every rank (collective): trained parameters are DeepSpeed's fp32
        master weights (in bf16 runs not the bf16 weights the model computes with), frozen
        parameters and buffers the module's own; as `read_checkpoint` gives them after a save."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        live = self.task.state_dict(keep_vars=True)  # parameters as themselves, not gathered
        params = {id(v): v for v in live.values() if isinstance(v, torch.nn.Parameter)}
        frozen = [p for p in params.values() if not p.requires_grad]
        full = {}
        gather = contextlib.nullcontext()
        if self.stage == 3 and frozen:  # ZeRO-3: frozen parameters have no fp32 partition
            gather = deepspeed.zero.GatheredParameters(frozen, modifier_rank=None)
        with gather:
            for p in frozen:
                full[id(p)] = p.detach().clone()
        for p in params.values():  # module order: the same collectives on every rank
            if p.requires_grad:
                full[id(p)] = safe_get_full_fp32_param(p).detach().clone()
        state = {k: full[id(v)] if id(v) in full else v.detach().clone() for k, v in live.items()}
        return unlift_scalars(state, self.scalar_names)

    def parameters_finite(self) -> bool:
        local = True
        for p in self.task.parameters():
            local = local and bool(torch.isfinite(_owned(p, self.dist.rank)).all())
        return all_true(local, self.dist.device)

    # ---------------------------------------------------------------- formats (no instance)

    @staticmethod
    def read_checkpoint(step_dir: Path) -> LazyTensors:
        """The full fp32 model state of one checkpoint directory, offline in one process, read one
        tensor at a time (`read_zero_checkpoint`)."""
        return read_zero_checkpoint(step_dir)


def read_zero_checkpoint(step_dir: Path) -> LazyTensors:
    """A ZeRO-2 or ZeRO-3 checkpoint's full fp32 weights, each read when asked for: trainable
    ones from the fp32 master partitions of every rank (the layout DeepSpeed's zero_to_fp32
    reads, which first concatenates every ZeRO-2 partition and loads whole files: a second copy
    of the model), frozen ones from the model-state files, and FROZEN_FILE's beside rebuilt
    ones. The files are memory-mapped and unpickled with only DeepSpeed's three checkpoint
    classes allowed (torch.load weights_only), so reading a tensor touches its bytes alone."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def load(path: Path) -> dict:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    def by_rank(pattern: str) -> list[Path]:
        files = list((step_dir / TAG).glob(pattern))
        return sorted(files, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name)[1]))

    optims = [load(f)["optimizer_state_dict"] for f in by_rank("*zero_pp_rank_*_optim_states.pt")]
    if not optims:
        raise FileNotFoundError(f"{step_dir / TAG} holds no ZeRO optimizer states")
    world, stage = len(optims), int(optims[0]["zero_stage"])
    model_files = by_rank("*zero_pp_rank_*_model_states.pt") if stage == 3 else [
        step_dir / TAG / "mp_rank_00_model_states.pt"]  # fmt: skip
    models = [load(f) for f in model_files]
    first = models[0]
    metas, reads = {}, {}

    def add(name: str, shape, read) -> None:
        metas[name] = torch.empty(shape, device="meta")
        reads[name] = read

    module = first["module"]
    for name in first["buffer_names"]:
        buffer = module[name]
        metas[name], reads[name] = as_meta(buffer), lambda b=buffer: b.clone()
        if buffer.is_floating_point():
            metas[name], reads[name] = metas[name].float(), lambda b=buffer: b.float()
    for name, shape in (first.get("frozen_param_shapes") or {}).items():
        if stage == 3:  # every rank's partition, padded to ceil(numel / W)
            parts = [m["frozen_param_fragments"][name] for m in models]
            add(name, shape, lambda p=parts, s=shape: torch.cat(p).narrow(0, 0, s.numel())
                .view(s).float())  # fmt: skip
        else:
            fragment = first["frozen_param_fragments"][name]
            add(name, shape, lambda f=fragment, s=shape: f.view(s).float())
    if stage == 3:
        # Each parameter is split evenly over the ranks (padded to ceil(numel / W)); a rank's
        # partitions follow each other in the order of param_shapes, across its groups.
        offset = 0
        for name, shape in ((k, v) for group in first["param_shapes"] for k, v in group.items()):
            part = math.ceil(shape.numel() / world)
            add(name, shape, lambda o=offset, p=part, s=shape: torch.cat([
                _span(opt["fp32_flat_groups"], o, p) for opt in optims
            ]).narrow(0, 0, s.numel()).view(s).clone())  # fmt: skip
            offset += part
    else:
        # A group's parameters lie one after another (each followed by its alignment padding)
        # in the concatenation of every rank's partition of the group.
        paddings = optims[0].get("param_alignment_paddings")
        for g, group in enumerate(first["param_shapes"]):
            parts = [opt["single_partition_of_fp32_groups"][g] for opt in optims]
            offset = 0
            for i, (name, shape) in enumerate(group.items()):
                add(name, shape, lambda o=offset, p=parts, s=shape: _span(p, o, s.numel())
                    .view(s).clone())  # fmt: skip
                offset += shape.numel() + (paddings[g][i] if paddings else 0)
    for name, source in (first.get("shared_params") or {}).items():
        if source in metas:
            metas[name], reads[name] = metas[source], reads[source]
    state = LazyTensors(metas, lambda key: reads[key]())
    if (step_dir / FROZEN_FILE).is_file():  # the frozen weights beside rebuilt ones
        from ..models.hub import lazy_safetensors

        frozen = lazy_safetensors([step_dir / FROZEN_FILE])
        state = state.merged(LazyTensors({k: v.float() for k, v in frozen.metas.items()},
                                         lambda key: frozen[key].float()))  # fmt: skip
    return state


def _span(chunks: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Elements start .. start + length of the concatenation of `chunks`, copying only those."""
    pieces, at = [], 0
    for chunk in chunks:
        lo, hi = max(start, at), min(start + length, at + chunk.numel())
        if lo < hi:
            pieces.append(chunk[lo - at : hi - at])
        at += chunk.numel()
    if not pieces:  # an empty parameter
        return chunks[0].new_empty(0)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()


def _bucket_bytes(cfg: Config, t: int, w: int, dtype_key: str | None) -> tuple[dict, int]:
    """(the run's resolved ZeRO section, bytes of one gradient bucket): `reduce_bucket_size`
    elements (DeepSpeed's default 5e8 where the JSON has none) of the dtype named at
    `dtype_key` (None: the training dtype). A bucket is allocated whole but filled by
    gradients, so at most T elements of it are ever resident."""
    ds = build_ds_config(cfg, w)
    zero = ds["zero_optimization"]
    training = "bf16" if cfg.engine.precision == "bf16" else "fp32"
    name = _dtype_name(_get(ds, dtype_key)) if dtype_key else training
    elements = min(int(zero.get("reduce_bucket_size", 500_000_000)), t)
    return zero, elements * (4 if name == "fp32" else 2)


class Zero2Engine(DeepSpeedEngine):
    """kind zero2: DeepSpeed ZeRO-2, optimizer state and gradients sharded."""

    stage = 2
    # ZeRO-2 keeps full parameters on every rank: only the optimizer side can move to CPU.
    offloads: tuple[str, ...] = ("none", "optimizer")

    @staticmethod
    def memory_per_rank(offload: str, precision: str, n: int, t: int, w: int) -> dict:
        """Bytes per rank of parameters, gradients and optimizer state (N parameters, T
        trained, W ranks, b = 2 in bf16 else 4):
          params bN + 4T/W (fp32 master partition)   grads 4T/W (reduced and accumulated in
          fp32, bf16 runs too)   optimizer 8T/W (AdamW m, v)
        offload=optimizer moves the master partition and the optimizer state to CPU."""
        b = 2 if precision == "bf16" else 4
        master = 0 if offload != "none" else 4 * t / w
        out = {"params": b * n + master, "grads": 4 * t / w, "optimizer": 8 * t / w}
        if offload != "none":
            out["optimizer"] = 0
        return {k: int(v) for k, v in out.items()}

    @staticmethod
    def buffers_per_rank(cfg: Config, t: int, w: int) -> int:
        """ZeRO-2's gradient buckets: one of `reduce_bucket_size` elements in the training
        dtype, two with overlap_comm (a second one is filled while the first is reduced;
        stage_1_and_2.py setup_buckets), allocated before every backward."""
        zero, one = _bucket_bytes(cfg, t, w, None)
        if not zero.get("contiguous_gradients", True):
            return 0
        return one * (2 if zero.get("overlap_comm", False) else 1)


class Zero3Engine(DeepSpeedEngine):
    """kind zero3: DeepSpeed ZeRO-3, parameters sharded too."""

    stage = 3
    loads_into_shards = True  # partition_while_reading
    offloads: tuple[str, ...] = ("none", "optimizer", "optimizer+params")

    @staticmethod
    def memory_per_rank(offload: str, precision: str, n: int, t: int, w: int) -> dict:
        """Bytes per rank of parameters, gradients and optimizer state (N parameters, T
        trained, W ranks, b = 2 in bf16 else 4):
          params bN/W + 4T/W (fp32 master partition)   grads 4T/W (reduced and accumulated in
          fp32, bf16 runs too)   optimizer 8T/W (AdamW m, v)
        offload=optimizer moves the master partition and the optimizer state to CPU,
        offload=optimizer+params the parameter partitions (bN/W) too."""
        b = 2 if precision == "bf16" else 4
        master = 0 if offload != "none" else 4 * t / w
        shards = 0 if offload == "optimizer+params" else b * n / w
        out = {"params": shards + master, "grads": 4 * t / w, "optimizer": 8 * t / w}
        if offload != "none":
            out["optimizer"] = 0
        return {k: int(v) for k, v in out.items()}

    @staticmethod
    def buffers_per_rank(cfg: Config, t: int, w: int) -> int:
        """ZeRO-3's gradient bucket: `reduce_bucket_size` elements in the communication dtype
        (fp32 unless the JSON says bf16), allocated once with contiguous_gradients (stage3.py:
        the IPG bucket gradients are copied into before each reduce-scatter)."""
        zero, one = _bucket_bytes(cfg, t, w, "communication_data_type")
        return one if zero.get("contiguous_gradients", True) else 0


def _owned(param: torch.nn.Parameter, rank: int) -> torch.Tensor:
    """The values of `param` this rank holds: under ZeRO-3 its partition without the padding
    that rounds the last partitions up (never written: uninitialised memory, which with
    offload_param once read as NaN), else the parameter itself."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return param
    size = part.numel()
    valid = min(max(param.ds_numel - rank * size, 0), size)
    return part.reshape(-1)[:valid]


def set_fp32_masters(initial: list[tuple[torch.nn.Parameter, torch.Tensor, int]], rank) -> None:
    """Set DeepSpeed's fp32 master weights to the fp32 values the parameters had before it cast
    them to bf16 (it starts the masters from the bf16 roundings: pretrained or init_from
    weights lost their low bits, and the curves parted from fsdp's by ~1e-2 in 20 steps). The
    bf16 weights are already those values rounded. `initial`: (parameter, its fp32 values from
    element `start` of the flattened parameter on; the whole of it from 0, or under ZeRO-3 this
    rank's partition); `rank`: ZeRO-3's partition index (each rank sets its partition, padding
    kept), None for ZeRO-1/2 (each rank its fragment, from the whole value)."""
    from deepspeed.utils import (
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    for param, value, start in initial:
        value = value.detach().reshape(-1).float()
        if rank is None:
            safe_set_full_fp32_param(param, value.view(param.shape))
            continue
        local = safe_get_local_fp32_param(param).detach().clone().reshape(-1)
        first = rank * local.numel() - start
        part = value[first : first + local.numel()]
        local[: part.numel()] = part
        safe_set_local_fp32_param(param, local)


def partition_while_reading(
    task: torch.nn.Module,
    stand_ins: lazy_tensors.StandIns,
    ds_config: dict,
    dist: DistInfo,
    bf16: bool,
) -> list[tuple[torch.nn.Parameter, torch.Tensor, int]]:
    """ZeRO-3 without the whole model on a rank: each parameter the build left a stand-in is read
    (a checkpoint's tensor, or its replayed random initialisation: core/deferred_init.py), cast
    as DeepSpeed would (bf16 runs), and partitioned at once by DeepSpeed's own zero.Init
    conversion (its broadcast from rank 0 included), in the order the replay completes them;
    the full tensor is freed before the next is read. A rank then holds its partitions and one
    tensor, where `deepspeed.initialize` on a built model held the model whole. Buffers are
    read whole (replicated, small). Returns, in bf16 runs, each trained parameter's fp32 values
    of this rank's partition (`set_fp32_masters`)."""
    import deepspeed
    from deepspeed.runtime.engine import CASTABLE_DTYPES

    # Not entered as a context: it converts the parameters it is given, with the run's config
    # (offload device, dtype) and process group.
    zero_init = deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(ds_config))
    if zero_init.mem_efficient_linear:  # as zero.Init(module=) does (bf16 numerics differ)
        zero_init._enable_mem_efficient_linear()
    world, rank = dist.world_size, dist.rank

    def order(tensor: torch.Tensor) -> int:
        return stand_ins.order(tensor) if stand_ins.is_stand_in(tensor) else -1

    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    buffers: dict[int, torch.Tensor] = {}
    for module in task.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                owners.setdefault(id(buffer), []).append((module, name))
                buffers[id(buffer)] = buffer
    params = list(task.parameters())  # each once, tied ones too
    initial = []
    for tensor in sorted([*params, *buffers.values()], key=order):
        if stand_ins.is_stand_in(tensor):
            value = stand_ins.value(tensor)
        else:  # a real buffer stays the very tensor (on this device): others may hold it
            value = tensor if id(tensor) in buffers else tensor.data
        value = value.to(dist.device)
        if id(tensor) in buffers:
            for module, name in owners[id(tensor)]:
                module._buffers[name] = value
            continue
        if not torch.isfinite(value).all():
            raise RuntimeError(
                f"a {tuple(tensor.shape)} weight was read as non-finite values: code that ran "
                "while the task was built computed from a checkpoint weight before it was read "
                "(call core.lazy_tensors.materialize(module) there first)"
            )
        if bf16 and tensor.requires_grad:
            part = math.ceil(value.numel() / world)  # DeepSpeed's partition: ceil(numel / W)
            initial.append((tensor, value.reshape(-1)[rank * part : (rank + 1) * part].clone(),
                            rank * part))  # fmt: skip
        if bf16 and value.dtype in CASTABLE_DTYPES:
            value = value.to(torch.bfloat16)
        tensor.data = value
        del value
        zero_init._convert_to_zero_parameters([tensor])  # partitions it: the full tensor freed
    zero_init._keep_in_fp32(task)  # as zero.Init(module=) ends (DeepSpeed's own build)
    return initial


def repair_universal_load(optimizer: torch.optim.Optimizer, hyper: list[dict]) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (0.19): it gives every param group
    the hyperparameters of the saved group 0 (the no-decay group would be decayed), and every
    group's state the very same `step` tensor, which AdamW then advances in place once per group
    per step (a wrong bias correction: the loss drifted by up to 6e-3). `hyper`: the groups'
    `group_hyperparameters` from before the load; each group's lr is then the schedule's, from
    its own base lr (`Engine.load_scheduler`), so several lr_groups come back right too."""
    restore_hyperparameters(optimizer, hyper)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def to_universal(directory: Path, out: Path, stage: int) -> None:
    """DeepSpeed's ds_to_universal, in a subprocess (it starts worker pools)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(directory / TAG), "--output_folder", str(tmp / TAG),
           "--num_extract_workers", "1", "--num_merge_workers", "1"]  # fmt: skip
    if stage < 3:  # ZeRO-2 checkpoints do not record universal_checkpoint_info
        cmd.append("--inject_missing_state")
    done = subprocess.run(cmd, capture_output=True, text=True)  # inherits DS_ACCELERATOR
    if done.returncode != 0:
        raise RuntimeError(f"universal checkpoint conversion failed:\n{done.stderr[-3000:]}")
    os.replace(tmp, out)
