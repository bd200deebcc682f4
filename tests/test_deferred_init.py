"""Deferred initialisation (core/deferred_init.py): a task built with its tensors deferred and
replayed one at a time has the eager build's values bit for bit, and leaves the random
generator where the eager build does: under fsdp, which builds this way, random initialisation
is engine-independent while no rank holds the whole model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cappa import overrides as cappa_overrides
from test_paligemma_task import overrides as paligemma_overrides
from test_paligemma_task import tok_dir  # noqa: F401 - fixture
from test_shard_loading import peak_after_building
from test_train import tiny_overrides
from test_vlm_dpo import dpo_overrides
from test_vlm_task import vlm_overrides

from core import lazy_tensors
from core.deferred_init import DeferredInit, NotReplayable
from core.loop import building_for
from core.recipe import load_config
from core.tasks import build_task


def assert_deferred_build_is_eager(cfg, materialized: bool = False) -> None:
    """Built as training builds for fsdp (loop.building_for), every deferred tensor is a
    stand-in; read in their order, they are the eager build's tensors. `materialized`: the
    build computes from its weights (deferred_init.materialize), so none is left deferred."""
    torch.manual_seed(0)
    eager_task = build_task(cfg)
    eager = eager_task.state_dict()
    torch.manual_seed(0)
    with building_for("fsdp"):
        task = build_task(cfg)
        stand_ins = lazy_tensors.active()
        assert task.rebuilt_digest == eager_task.rebuilt_digest  # a resume checks it
        state = task.state_dict(keep_vars=True)
        assert state.keys() == eager.keys()
        later = {name: t for name, t in state.items() if stand_ins.is_stand_in(t)}
        if materialized:
            assert not later
        else:
            assert len(later) > len(state) // 2, "most of the task is deferred"
        real = [name for name in state if name not in later]
        assert not any(state[name].is_meta for name in real), "a meta tensor nobody replays"
        values = {}  # a tied weight is one stand-in under two names, read once
        for name in sorted(later, key=lambda n: stand_ins.order(later[n])):
            if id(later[name]) not in values:
                values[id(later[name])] = stand_ins.value(later[name])
            value = values[id(later[name])]
            assert value.dtype == eager[name].dtype and torch.equal(value, eager[name]), name
        for name in real:
            assert torch.equal(state[name], eager[name]), name
    assert tied(task) == tied(eager_task)  # one parameter under several names, as eager


def tied(task) -> list[list[str]]:
    return sorted(names for names in lazy_tensors.tied_names(task) if len(names) > 1)


def test_a_siglip_built_deferred_is_the_eager_build(shapes_dir, tmp_path):
    cfg = load_config("tiny_siglip", tiny_overrides(shapes_dir, tmp_path / "run", 2))
    assert_deferred_build_is_eager(cfg)


def test_siglip2_and_cappa_built_deferred_are_their_eager_builds(shapes_dir, tmp_path):
    for recipe in ("tiny_cappa", "tiny_siglip2"):
        assert_deferred_build_is_eager(load_config(recipe, cappa_overrides(shapes_dir, tmp_path)))


@pytest.mark.parametrize("extra", [
    {"task.stage": "sft", "task.init_from": ""},
    {"task.stage": "sft", "task.init_from": "", "task.lm_tuning": "lora", "task.lora.r": 4},
])  # fmt: skip
def test_a_vlm_built_deferred_is_the_eager_build(vqa, tmp_path, extra):
    cfg = load_config("tiny_vlm_stage1", vlm_overrides(vqa, tmp_path / "run", **extra))
    assert_deferred_build_is_eager(cfg)


@pytest.mark.parametrize("reference", ["lora", "copy"])
def test_a_dpo_task_built_deferred_is_the_eager_build(vqa, shapes_dir, tmp_path, reference):
    """The `copy` reference is copied from the weights at build: materialised whole there, as
    the eager build holds them, with the same values."""
    cfg = load_config("tiny_vlm_stage1", dpo_overrides(vqa, shapes_dir, tmp_path, reference))
    assert_deferred_build_is_eager(cfg, materialized=reference == "copy")


def test_paligemma_built_deferred_is_the_eager_build(vqa, tok_dir, tmp_path):  # noqa: F811
    cfg = load_config("tiny_paligemma", paligemma_overrides(vqa, tok_dir, tmp_path / "run"))
    assert_deferred_build_is_eager(cfg)


def test_random_draws_on_real_tensors_during_a_deferred_build_are_refused():
    deferred = DeferredInit()
    refused = pytest.raises(NotReplayable, match="drew random numbers on real tensors")
    with refused, deferred.recording():
        torch.nn.Linear(4, 4)
        torch.randn(3, device="meta")  # meta in an eager build too: fine
        torch.nn.init.normal_(torch.tensor([1.0, 2.0]))  # a real tensor: out of order


def test_reseeding_during_a_deferred_build_is_refused():
    refused = pytest.raises(NotReplayable, match="reseeded")
    with refused, DeferredInit().recording():
        torch.nn.Linear(4, 4)
        torch.manual_seed(1)  # replay would draw the next layer's weights from the old stream
        torch.nn.Linear(4, 4)


def test_replay_frees_what_it_passes_and_keeps_one_wanted_tensor_at_a_time():
    torch.manual_seed(0)
    eager = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    after_eager = torch.get_rng_state()
    torch.manual_seed(0)
    deferred = DeferredInit()
    with deferred.recording():
        model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    state = model.state_dict(keep_vars=True)
    deferred.want(state.values())
    held = []
    for name in deferred.completion_order(state):
        value = deferred.value(state[name])
        assert torch.equal(value, eager.state_dict()[name])
        held.append(len(deferred._real) + len(deferred._done))
    assert max(held) <= 2, held  # a layer's weight and bias, never the model
    deferred.finish()  # replayed every draw the eager build made, and no other
    assert torch.equal(torch.get_rng_state(), after_eager)
    with pytest.raises(ValueError, match="more often than announced"):
        deferred.value(state["0.weight"])


def random_towers(shapes: Path, run: Path, layers: int, kind: str = "fsdp") -> list[str]:
    """tiny_siglip under engine `kind` with two random towers of `layers` blocks of width 512."""
    width = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": layers,
             "num_attention_heads": 8}  # fmt: skip
    over = {f"model.{tower}.{k}": v for tower in ("vision_config", "text_config")
            for k, v in width.items()}  # fmt: skip
    over.update(
        {
            "model.text_config.num_key_value_heads": 8,
            "model.text_config.head_dim": 64,
            "task.embed_dim": 512,
            "engine.kind": kind,
            "eval.evaluators": "[]",
        }
    )
    return tiny_overrides(shapes, run / "run", 1, **over)


@pytest.mark.slow
def test_a_ranks_memory_grows_by_its_shard_of_a_random_model(shapes_dir, tmp_path):
    """Random towers of 2 blocks, then of 10 (+59M parameters, 235 MB in fp32), built and
    sharded by fsdp at 2 ranks: each rank's peak grows by about half of that (its shards).
    Measured: +0.50x; when every rank built the whole model first, +0.99x. glibc's heap is
    fixed to mmap what it frees (as benchmarks/peak_memory.py --mmap-threshold): this measures
    what the code holds. With glibc's defaults the replay's whole tensors, each freed after its
    rows are copied out, leave holes in the heap between the kept rows: +0.72x to +0.78x."""

    added, grew = growth_with_random_towers(shapes_dir, tmp_path, "fsdp")
    assert 0.4 * added < grew < 0.65 * added


def growth_with_random_towers(shapes: Path, tmp: Path, kind: str) -> tuple[int, int]:
    """(bytes of weights added from 2 to 10 random blocks per tower, how much a rank's peak grew)
    once `kind` has its random model (zero3: when it calls deepspeed.initialize), at 2 ranks,
    glibc's heap fixed to return what is freed (see above)."""

    def nbytes(layers: int) -> int:
        cfg = load_config("tiny_siglip", random_towers(shapes, tmp, layers))
        with torch.device("meta"):
            task = build_task(cfg)
        return sum(p.numel() * p.element_size() for p in task.parameters())

    def peak(run: Path, layers: int) -> int:
        args = random_towers(shapes, run, layers, kind)
        return peak_after_building(run, args, at_initialize=kind == "zero3",
                                   MALLOC_MMAP_THRESHOLD_="131072")  # fmt: skip

    added = nbytes(10) - nbytes(2)
    grew = peak(tmp / "a", 10) - peak(tmp / "b", 2)
    print(f"+{added / 1e6:.0f} MB of weights: a rank's peak +{grew / 1e6:.0f} MB")
    return added, grew


@pytest.mark.slow
def test_zero3_partitions_a_random_model_as_it_is_replayed(shapes_dir, tmp_path):
    """ZeRO-3 gets the model partitioned (engines/zero.py partition_while_reading): when it calls
    deepspeed.initialize, at 2 ranks, a rank's peak has grown by about half of the weights added
    (its fp32 partitions), where DeepSpeed given a model built whole held all of them.
    Measured: +0.52x; built whole (before): +1.01x."""
    added, grew = growth_with_random_towers(shapes_dir, tmp_path, "zero3")
    assert 0.4 * added < grew < 0.65 * added


def test_a_deferred_weight_copied_from_a_checkpoints_stand_in_replays_its_value():
    """Build code that copies a checkpoint weight (a stand-in under fsdp) into a module it made
    is replayed with the weight's value, not the stand-in's placeholder."""
    weight = torch.arange(16.0).reshape(4, 4)
    deferred = DeferredInit()
    with lazy_tensors.StandIns().active() as stand_ins:
        stand_in = stand_ins.stand_in(torch.empty(4, 4, device="meta"), weight.clone)
        with deferred.recording():
            layer = torch.nn.Linear(4, 4)
            with torch.no_grad():
                layer.weight.copy_(stand_in)
        deferred.want([layer.weight, layer.bias])
        assert torch.equal(deferred.value(layer.weight), weight)


def test_a_rebuilt_weight_left_deferred_is_a_clear_error():
    """A resume compares a digest of the weights a task rebuilds: they need values at build."""
    from core.tasks.base import rebuilt_digest

    class Rebuilds(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.reference = torch.nn.Linear(2, 2)

        def rebuilt_prefixes(self):
            return ("reference.",)

    deferred = DeferredInit()
    with deferred.recording():
        task = Rebuilds()
    with pytest.raises(RuntimeError, match="reference.bias: a weight the task rebuilds"):
        rebuilt_digest(task, deferred)


class Drawn(torch.nn.Module):
    """Every way a build here makes a tensor: a random factory, a sin-cos table computed from
    arange, trunc_normal_ (which skips meta tensors), an initialiser over a constructor's draw,
    and a real constant copied in."""

    def __init__(self):
        super().__init__()
        self.noise = torch.nn.Parameter(torch.randn(8, 4))
        position = torch.arange(6).float()[:, None] / 10 ** (torch.arange(4).float() / 4)
        self.register_buffer("table", torch.cat([position.sin(), position.cos()], dim=1))
        self.cls = torch.nn.Parameter(torch.zeros(1, 4))
        torch.nn.init.trunc_normal_(self.cls, std=0.02)
        self.head = torch.nn.Linear(4, 3)
        torch.nn.init.normal_(self.head.weight, std=0.5)  # overwrites kaiming's draw
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))


def test_every_way_of_making_a_tensor_replays_as_eager():
    torch.manual_seed(3)
    eager = Drawn().state_dict()
    after_eager = torch.get_rng_state()
    torch.manual_seed(3)
    deferred = DeferredInit()
    with deferred.recording():
        model = Drawn()
    state = model.state_dict(keep_vars=True)
    assert all(deferred.is_deferred(t) for t in state.values())
    deferred.want(state.values())
    for name in deferred.completion_order(state):
        assert torch.equal(deferred.value(state[name]), eager[name]), name
    deferred.finish()
    assert torch.equal(torch.get_rng_state(), after_eager)
