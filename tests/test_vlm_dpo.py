"""VLM stage 4 (task.kind vlm_dpo): ln 2 at policy = reference, packed per-sequence log-probs
against unpacked forwards, one vision forward per pair, the LoRA reference's rules, a few steps
that learn the preference, and (slow) every engine on 2 ranks against DDP plus an exact resume
after SIGKILL."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_engines import assert_resumed_exactly, kill_after, losses
from test_train import metrics, run_cli
from test_vlm_task import vlm_overrides

from core.checkpoint import list_checkpoints
from core.config import ConfigError
from core.data.errors import BadSample
from core.data.shards import open_shard
from core.engines import ENGINES
from core.recipe import load_config
from core.tasks.vlm_dpo import pair_embeddings, pair_key, sequence_logps

STEPS = 6


def dpo_overrides(vqa: Path, shapes: Path, run_dir: Path, reference: str = "lora", **extra):
    """The tiny VLM (test_vlm_task's) on the synthetic shapes shards' preference pairs."""
    over = {
        "task.kind": "vlm_dpo", "task.stage": "sft", "task.init_from": "",
        "task.lm_tuning": "lora" if reference == "lora" else "full",
        "task.dpo.reference": reference, "task.lora.r": 4, "task.lora.dropout": 0.0,
        "data.train": str(shapes / "train-*.tar"), "data.val": str(shapes / "val-*.tar"),
        "data.mixture": "{}", "data.max_seq_len": 256, "data.batch_size": 4,
        "eval.evaluators": '["loss"]', **extra,
    }  # fmt: skip
    return vlm_overrides(vqa, run_dir, STEPS, **over)


def dpo_task(vqa, shapes, tmp_path, reference="lora", **extra):
    from core.tasks import build_task

    torch.manual_seed(0)
    over = dpo_overrides(vqa, shapes, tmp_path / "run", reference, **extra)
    return build_task(load_config("tiny_vlm_stage1", over))


def pairs(task, shapes: Path, n: int, start: int = 0) -> list[dict]:
    shard = open_shard(str(shapes / "train-000000.tar"))
    return [task.train_decoder(shard.read(i)) for i in range(start, start + n)]


@pytest.mark.parametrize(
    "reference, extra",
    [("lora", {}), ("copy", {}), ("lora", {"task.dpo.label_smoothing": 0.2})],
)
def test_the_first_loss_is_ln_2_with_policy_equal_to_reference(
    vqa, shapes_dir, tmp_path, reference, extra
):
    task = dpo_task(vqa, shapes_dir, tmp_path, reference, **extra)
    batch = task.packed_collate()(pairs(task, shapes_dir, 4))
    out = task(batch)
    # z = 0 exactly (the same computation twice): -(1 - eps) ln(1/2) - eps ln(1/2) = ln 2
    assert abs(out.loss.item() / task.loss_weight(batch) - math.log(2)) < 1e-6
    assert task.loss_weight(batch) == 4
    assert out.metrics["rewards/margins"].item() == 0.0
    assert out.metrics["logps/chosen"].item() < 0
    assert out.metrics["dpo_loss"].item() == pytest.approx(math.log(2), abs=1e-6)


def test_the_sft_term_is_logged_apart_from_the_preference_loss(vqa, shapes_dir, tmp_path):
    """With the SFT term (the demo's sft_weight 1.0) the first loss is not ln 2, but its
    `dpo_loss` is, and `sft_loss` is each chosen response's mean token NLL, computed here from
    per-sequence log-probs: loss = pairs x (dpo_loss + weight x sft_loss)."""
    task = dpo_task(vqa, shapes_dir, tmp_path, "lora", **{"task.dpo.sft_weight": 0.5})
    batch = task.packed_collate()(pairs(task, shapes_dir, 4))
    out = task(batch)
    _, _, logps, counts = task.pair_logps(batch)
    nll = (-logps[:, 0] / counts[:, 0]).mean().item()  # side 0: chosen
    assert out.metrics["dpo_loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["sft_loss"].item() == pytest.approx(nll, rel=1e-5)
    assert out.loss.item() == pytest.approx(4 * (math.log(2) + 0.5 * nll), rel=1e-5)


@pytest.mark.parametrize(
    "loss, expected", [("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2), ("robust", math.log(2))]
)
def test_the_first_loss_of_each_kind_and_the_sft_term(vqa, shapes_dir, tmp_path, loss, expected):
    # z = 0: hinge relu(1 - 0), ipo (0 - 1 / (2 beta))^2, robust -ln(1/2) (eps 0); plus
    # sft_weight x each pair's chosen mean token NLL, written out from the per-sequence sums
    task = dpo_task(
        vqa, shapes_dir, tmp_path, **{"task.dpo.loss": loss, "task.dpo.sft_weight": 0.5}
    )
    batch = task.packed_collate()(pairs(task, shapes_dir, 4))
    with torch.no_grad():
        out = task(batch)
        features = task.vision_features(batch["pixel_values"])
        embeds = pair_embeddings(task.lm, task.projector, batch, features, task.image_token_id)
        logps, counts = sequence_logps(task.lm, embeds, batch)
    nll = -(logps[0::2] / counts[0::2]).mean().item()
    assert nll > 0
    assert out.loss.item() / 4 == pytest.approx(expected + 0.5 * nll, rel=1e-6)


@pytest.mark.parametrize("reference", ["lora", "copy"])
def test_mdpo_adds_the_conditional_and_anchor_terms(vqa, shapes_dir, tmp_path, reference):
    task = dpo_task(vqa, shapes_dir, tmp_path, reference, **{"task.dpo.mdpo": "true"})
    decoded = pairs(task, shapes_dir, 3)
    again = pairs(task, shapes_dir, 3)
    for pair, same in zip(decoded, again):  # a crop drawn from the key: the same every time
        assert torch.equal(pair["cropped_pixel_values"], same["cropped_pixel_values"])
        assert not torch.allclose(pair["cropped_pixel_values"], pair["pixel_values"])
    batch = task.packed_collate()(decoded)
    assert batch["sides"] == 3 and len(batch["pixel_values"]) == 6  # 3 images + their crops
    # the third sequence of each pair is its chosen one, on the crops (images 3..5)
    ids, seqs = batch["input_ids"], batch["sequence_ids"]
    for p, pair in enumerate(decoded):
        assert torch.equal(ids[seqs == 3 * p + 2], pair["chosen_ids"])
    blocks = [int(seqs[ids == task.image_token_id][k]) for k in range(0, 9 * 4, 4)]
    crops = [i for s, i in zip(blocks, batch["image_index"].tolist()) if s % 3 == 2]
    assert sorted(crops) == [3, 4, 5]
    images = []
    task.vision.register_forward_hook(lambda _m, args, _o: images.append(len(args[0])))
    out = task(batch)
    assert images == [6]  # one vision forward: the images and their crops
    # z = 0 in all three terms: 3 ln 2 a pair
    assert abs(out.loss.item() / 3 - 3 * math.log(2)) < 1e-6
    assert out.metrics["mdpo/anchor_loss"].item() == pytest.approx(math.log(2), rel=1e-6)
    out.loss.backward()  # and it trains: one step lowers it
    params = [p for p in task.parameters() if p.requires_grad]
    torch.optim.SGD(params, lr=0.5).step()
    assert task(batch).loss.item() < out.loss.item()


def test_packed_log_probs_equal_each_sequence_alone(vqa, shapes_dir, tmp_path):
    task = dpo_task(vqa, shapes_dir, tmp_path).eval()
    decoded = pairs(task, shapes_dir, 3)
    batch = task.packed_collate()(decoded)
    assert batch["input_ids"].shape[0] < 6  # sequences share rows
    with torch.no_grad():
        features = task.vision_features(batch["pixel_values"])
        embeds = pair_embeddings(task.lm, task.projector, batch, features, task.image_token_id)
        packed, counts = sequence_logps(task.lm, embeds, batch)
        alone = []
        for pair in decoded:
            for side in ("chosen", "rejected"):
                logp, count = logp_alone(task, pair, side)
                alone.append(logp)
                assert counts[len(alone) - 1] == count
    torch.testing.assert_close(packed, torch.stack(alone), rtol=1e-5, atol=1e-4)


def logp_alone(task, pair: dict, side: str) -> tuple[torch.Tensor, int]:
    """(log-prob sum, supervised tokens) of one response by VLMTask's own path: its image
    embedding and a plain causal forward of the one sequence, unpacked."""
    ids, labels = pair[f"{side}_ids"][None], pair[f"{side}_labels"][None]
    embeds = task.input_embeddings(ids, pair["pixel_values"])
    logits = task.lm(inputs_embeds=embeds).float()
    logp = F.log_softmax(logits[0, :-1], -1)
    target = labels[0, 1:]
    keep = target != -100
    return logp[keep].gather(1, target[keep, None]).sum(), int(keep.sum())


def test_preference_evaluator_ranks_every_held_out_pair_by_the_implicit_reward(
    vqa, shapes_dir, tmp_path
):
    from core.distributed import DistInfo
    from core.evaluators import EvalContext, build_evaluators

    task = dpo_task(vqa, shapes_dir, tmp_path, **{"eval.batch_size": 5})  # batches of 5 pairs
    torch.manual_seed(1)
    with torch.no_grad():  # adapters off zero: the policy differs from its reference
        for name, param in task.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    task.eval()
    (evaluator,) = build_evaluators(["preference"], task)
    ctx = EvalContext(task.cfg, DistInfo(0, 1, 0, torch.device("cpu")), 0, tmp_path)
    with torch.no_grad():
        got = evaluator(task, ctx)
        # Brute force: every pair of the val shard, each response alone, adapters on and off.
        shard = open_shard(str(shapes_dir / "val-000000.tar"))
        wins, margins = [], []
        for i in range(len(shard)):
            pair = task.train_decoder(shard.read(i))
            reward = {}
            for side in ("chosen", "rejected"):
                policy = logp_alone(task, pair, side)[0]
                with task.adapters_off():
                    reference = logp_alone(task, pair, side)[0]
                reward[side] = 0.1 * (policy - reference).item()  # beta 0.1
            wins.append(reward["chosen"] > reward["rejected"])
            margins.append(reward["chosen"] - reward["rejected"])
    assert got["num_pairs"] == len(wins) == len(shard)
    assert 0 < sum(wins) < len(wins)  # a ranking that can be wrong either way
    assert got["preference_acc"] == sum(wins) / len(wins)
    assert got["reward_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)


@pytest.mark.parametrize("reference", ["lora", "copy"])
def test_each_image_is_encoded_once_per_pair(vqa, shapes_dir, tmp_path, reference):
    task = dpo_task(vqa, shapes_dir, tmp_path, reference)
    images = []
    task.vision.register_forward_hook(lambda _m, args, _o: images.append(len(args[0])))
    batch = task.packed_collate()(pairs(task, shapes_dir, 3))
    assert len(batch["image_index"]) == 6  # two image blocks per pair...
    task(batch).loss.backward()
    assert images == [3]  # ...one vision forward of the 3 images


def test_lora_reference_trains_only_adapters(vqa, shapes_dir, tmp_path):
    task = dpo_task(vqa, shapes_dir, tmp_path)
    assert {n.split(".")[0] for n, p in task.named_parameters() if p.requires_grad} == {"lm"}
    assert all("lora_" in n for n, p in task.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="only LoRA weights may train"):
        dpo_task(vqa, shapes_dir, tmp_path, **{"task.trainable": "[projector.*, lm.*.lora_*]"})
    with pytest.raises(ConfigError, match="must stay frozen"):
        dpo_task(vqa, shapes_dir, tmp_path, "copy", **{"task.trainable": "[vision.*, lm.*]"})
    with pytest.raises(ConfigError, match="lm_tuning: lora"):
        dpo_task(vqa, shapes_dir, tmp_path, **{"task.lm_tuning": "full"})


def test_copy_reference_is_frozen_and_left_out_of_exports(vqa, shapes_dir, tmp_path):
    task = dpo_task(vqa, shapes_dir, tmp_path, "copy")
    ref = [p for n, p in task.named_parameters() if n.startswith("reference.")]
    assert ref and not any(p.requires_grad for p in ref)
    assert "reference" in task.blocks()
    out = tmp_path / "export"
    task.export_hf(out, task.state_dict())
    assert (out / "lm").is_dir() and not (out / "reference").exists()


@pytest.mark.parametrize("reference", ["lora", "copy"])
def test_a_few_steps_learn_the_preference(vqa, shapes_dir, tmp_path, reference):
    task = dpo_task(vqa, shapes_dir, tmp_path, reference)
    frozen = {k: v.clone() for k, v in task.state_dict().items() if k.startswith("reference.")}
    batch = task.packed_collate()(pairs(task, shapes_dir, 4))
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    losses, margins = [], []
    for _ in range(4):
        out = task(batch)
        losses.append(out.loss.item() / 4)
        margins.append(out.metrics["rewards/margins"].item())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] and margins[-1] > margins[0] == 0.0
    assert all(torch.equal(task.state_dict()[k], v) for k, v in frozen.items())  # never moves


def precomputed(tmp_path: Path, train: str) -> dict:
    return {"task.lm_tuning": "lora", "data.train": train,
            "task.dpo.reference_logps": str(tmp_path / "reference.json")}  # fmt: skip


def write_reference(vqa, shapes, tmp_path, recipe="tiny_vlm_stage1", over=None) -> list[str]:
    """Overrides of a `precomputed` run (default: over the first training shard), its file
    written from the same starting model (the loop's seed)."""
    from core.tasks.vlm_dpo import VLMDPOTask, precompute_reference_logps

    extra = precomputed(tmp_path, str(shapes / "train-000000.tar"))
    over = over or dpo_overrides(vqa, shapes, tmp_path / "run", "precomputed", **extra)
    cfg = load_config(recipe, over)
    torch.manual_seed(cfg.seed)
    writer = VLMDPOTask(cfg, load_reference=False)
    assert precompute_reference_logps(writer, tmp_path / "reference.json", batch_size=4).is_file()
    return over


def test_dpo_reference_command_writes_the_same_file(vqa, shapes_dir, tmp_path):
    """`vlscale dpo-reference` (launch/dpo_reference.py) writes what the function does."""
    import json

    from launch.cli import main

    (tmp_path / "fn").mkdir()
    over = write_reference(vqa, shapes_dir, tmp_path / "fn")
    out = tmp_path / "cli.json"
    assert main(["dpo-reference", "tiny_vlm_stage1", *over, "--out", str(out),
                 "--batch-size", "4"]) == 0  # fmt: skip
    expected = json.loads((tmp_path / "fn" / "reference.json").read_text())
    assert json.loads(out.read_text()) == expected and expected["samples"]


def test_precomputed_reference_log_probs(vqa, shapes_dir, tmp_path):
    from core.tasks import build_task
    from core.tasks.vlm_dpo import PreferenceTrainDecoder

    over = write_reference(vqa, shapes_dir, tmp_path)
    stored = json.loads((tmp_path / "reference.json").read_text())["samples"]
    assert len(stored) == 32 + 32  # every pair of the training shard and of the validation one
    task = dpo_task(vqa, shapes_dir, tmp_path, "precomputed", **{
        "task.lm_tuning": "lora", "task.dpo.reference_logps": str(tmp_path / "reference.json"),
    })  # fmt: skip
    batch = task.packed_collate()(pairs(task, shapes_dir, 4))  # the writer's first batch
    calls = []
    task.lm.register_forward_hook(lambda *_: calls.append(1))
    out = task(batch)
    assert calls == [1]  # no reference forward
    assert abs(out.loss.item() / 4 - math.log(2)) < 1e-6  # the same packing: the same sums
    # ... and they are the LoRA reference's (adapters off), computed live, packed otherwise
    live = dpo_task(vqa, shapes_dir, tmp_path)
    other = live.packed_collate()(pairs(live, shapes_dir, 3, start=1))
    features = live.vision_features(other["pixel_values"])
    with torch.no_grad():
        ref = live.reference_logps(other, features, pair_embeddings(
            live.lm, live.projector, other, features, live.image_token_id))  # fmt: skip
    torch.testing.assert_close(
        live.packed_collate()(pairs(task, shapes_dir, 3, start=1))["reference_logps"].reshape(-1),
        ref, rtol=1e-5, atol=1e-4,
    )  # fmt: skip
    # Another starting model is refused when the task is built...
    torch.manual_seed(1)
    with pytest.raises(ConfigError, match="was written from model"):
        build_task(load_config("tiny_vlm_stage1", over))
    # ... a pair whose data changed stops the run, and a pair the file lacks is skipped.
    decoder: PreferenceTrainDecoder = task.train_decoder
    shard = open_shard(str(shapes_dir / "train-000000.tar"))
    first = shard.read(0)
    decoder.reference[pair_key(first)]["hash"] = "0" * 64
    with pytest.raises(ValueError, match="of another sample"):
        decoder(first)
    del decoder.reference[pair_key(first)]
    with pytest.raises(BadSample, match="no_reference_logps"):
        decoder(first)


def test_mdpo_with_precomputed_reference_equals_the_live_reference(vqa, shapes_dir, tmp_path):
    """mDPO's third sequence (the chosen response on the crop) has its reference log-prob in the
    file too: the loss equals that of the same adapters with the live LoRA reference; a file
    written without mDPO is refused by an mDPO run."""
    mdpo = {"task.dpo.mdpo": "true"}
    extra = precomputed(tmp_path, str(shapes_dir / "train-000000.tar"))
    over = dpo_overrides(vqa, shapes_dir, tmp_path / "run", "precomputed", **extra, **mdpo)
    write_reference(vqa, shapes_dir, tmp_path, over=over)
    stored = json.loads((tmp_path / "reference.json").read_text())["samples"]
    assert all(set(entry) == {"hash", "chosen", "rejected", "cropped"} for entry in stored.values())
    task = dpo_task(vqa, shapes_dir, tmp_path, "precomputed", **{**extra, **mdpo})
    live = dpo_task(vqa, shapes_dir, tmp_path, "lora", **mdpo)
    torch.manual_seed(3)
    with torch.no_grad():  # the same adapters, off zero, in both
        for (name, a), (_, b) in zip(task.named_parameters(), live.named_parameters()):
            if "lora_B" in name:
                b.copy_(a.normal_(0, 0.3))
    batch = task.packed_collate()(pairs(task, shapes_dir, 4))  # the writer's first batch
    assert batch["reference_logps"].shape == (4, 3)
    got, expected = task(batch), live(live.packed_collate()(pairs(live, shapes_dir, 4)))
    assert abs(got.loss.item() - expected.loss.item()) < 1e-4 * abs(expected.loss.item())
    assert got.loss.item() / 4 != pytest.approx(3 * math.log(2), abs=1e-3)  # not the first step's
    plain = tmp_path / "plain"
    plain.mkdir()
    write_reference(vqa, shapes_dir, plain)  # without mDPO: no crops in the file
    task.train_decoder.reference = json.loads((plain / "reference.json").read_text())["samples"]
    with pytest.raises(ValueError, match="none on mDPO's cropped images"):
        pairs(task, shapes_dir, 1)


# ---------------------------------------------------------------------------- 2 ranks
def cli_overrides(vqa, shapes, run_dir: Path, kind: str, mode: str) -> list[str]:
    """mode: a reference (lora, copy, precomputed) or mdpo (lora + mDPO's terms)."""
    written = precomputed(shapes.parent / "dpo_reference", str(shapes / "train-*.tar"))
    extra = {"precomputed": written, "mdpo": {"task.dpo.mdpo": "true"}}.get(mode, {})
    return dpo_overrides(vqa, shapes, run_dir, "lora" if mode == "mdpo" else mode, **{
        "engine.kind": kind, "engine.precision": "fp32", "optim.lr": 3e-3,
        "task.dpo.sft_weight": 0.0,  # the recipe's SFT term off: the first loss is ln 2
        "data.shuffle": "false", "checkpoint.every": 2, "checkpoint.keep": 3, "eval.every": 0,
        **extra,
    })  # fmt: skip


def train_dpo(vqa, shapes, run_dir: Path, kind: str, reference: str) -> subprocess.Popen:
    over = cli_overrides(vqa, shapes, run_dir, kind, reference)
    return run_cli(["train", "tiny_vlm_stage4", *over], nproc=2)


REFERENCES = ["lora", "copy", "precomputed", "mdpo"]
# The uninterrupted runs: ddp in every mode (the reference curves), every engine in mode copy
# (whose reference stays out of checkpoints, engine by engine), and each pair the resume tests
# below continue. Each is a two-rank job of ~8 s; all 16 pairs took 3 minutes.
STRAIGHT = sorted({("ddp", mode) for mode in REFERENCES} | {(k, "copy") for k in ENGINES}
                  | {("fsdp", "lora"), ("fsdp", "precomputed"), ("zero2", "mdpo")})  # fmt: skip


@pytest.fixture(scope="module")
def straight(vqa, shapes_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vlm_dpo_engines")
    written = shapes_dir.parent / "dpo_reference"  # every pair of the 3 training shards
    written.mkdir(exist_ok=True)
    over = cli_overrides(vqa, shapes_dir, root / "unused", "ddp", "precomputed")
    write_reference(vqa, shapes_dir, written, "tiny_vlm_stage4", over)
    for kind, reference in STRAIGHT:
        run = root / f"{kind}-{reference}"
        code = train_dpo(vqa, shapes_dir, run, kind, reference).wait(timeout=600)
        assert code == 0, f"{kind} {reference} failed"
    return root


@pytest.mark.slow
@pytest.mark.parametrize("reference", REFERENCES)
def test_sharded_engines_agree_with_ddp_on_2_ranks(straight, reference):
    """The sharded engines run in this mode (STRAIGHT) follow ddp's loss curve."""
    ref = losses(straight / f"ddp-{reference}")
    # ln 2 (mDPO: 3 ln 2) up to the reference's summation order (precomputed: packed otherwise
    # when written)
    first = (3 if reference == "mdpo" else 1) * math.log(2)
    tolerance = 1e-5 if reference == "precomputed" else 1e-6
    assert len(ref) == STEPS and abs(ref[0] - first) < tolerance
    worst = {}
    for kind in [k for k, mode in STRAIGHT if mode == reference and k != "ddp"]:
        curve = losses(straight / f"{kind}-{reference}")
        assert len(curve) == STEPS, kind
        worst[kind] = max(abs(a - b) / abs(b) for a, b in zip(curve, ref))
    print(f"reference={reference}: max relative loss difference to ddp:", worst)
    assert worst and all(v <= 1e-4 for v in worst.values()), worst
    # The reward metrics are over both ranks' pairs (4 each): a rank's own accuracy would be a
    # multiple of 1/4, the global one is a multiple of 1/8 (and some steps' are odd eighths).
    if reference == "precomputed":
        return  # its accuracies on these pairs happen to be even eighths: nothing to tell
    eighths = [r["rewards/accuracies"] * 8 for r in metrics(straight / f"ddp-{reference}")
               if "loss" in r]  # fmt: skip
    assert all(abs(e - round(e)) < 1e-9 for e in eighths) and any(round(e) % 2 for e in eighths)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ENGINES)
def test_the_copy_reference_stays_out_of_checkpoints_and_is_rebuilt(straight, kind):
    """Mode copy: no checkpoint holds the reference (the other frozen weights, the vision
    tower, are kept); reading the run back rebuilds it as training built it, so the held-out
    DPO loss of `vlscale eval` equals the training run's own final evaluation."""
    from core.consolidate import checkpoint_dir, read_state
    from launch.evaluate import evaluate

    run = straight / f"{kind}-copy"
    saved = read_state(checkpoint_dir(run), kind)
    assert not [k for k in saved if k.startswith("reference.")]
    assert any(k.startswith("vision.") for k in saved) and any(k.startswith("lm.") for k in saved)
    trained = json.loads((run / "eval.json").read_text())
    assert trained["step"] == STEPS
    assert evaluate(run, [{"loss": {}}])["loss"]["loss"] == pytest.approx(trained["loss"], abs=1e-6)


def test_a_resume_with_another_rebuilt_reference_is_refused(vqa, shapes_dir, tmp_path):
    """The reference is rebuilt from task.init_from on resume: when that run's checkpoint has
    changed since, resuming would train against another reference; it is refused."""
    from safetensors.torch import load_file, save_file

    from core.loop import train

    first = tmp_path / "stage"
    train(load_config("tiny_vlm_stage1", vlm_overrides(vqa, first, 2)))
    over = dpo_overrides(vqa, shapes_dir, tmp_path / "dpo", "copy", **{"task.init_from": str(first),
                         "optim.max_steps": 2, "checkpoint.every": 1})  # fmt: skip
    train(load_config("tiny_vlm_stage1", over))
    weights = first / "checkpoints" / "step_2" / "model.safetensors"
    state = load_file(weights)
    state["projector.proj.weight"] = state["projector.proj.weight"] + 1.0  # same size on disk
    save_file(state, weights)
    with pytest.raises(ConfigError, match="task.init_from=.* changed since"):
        train(load_config("tiny_vlm_stage1", over))


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, reference",
    # Every mode once, on a sharded engine (not all 16 pairs: each is two two-rank jobs; ddp's
    # SIGKILL resume is tests/test_train.py's; each mode's parity with ddp is tested above).
    [("fsdp", "lora"), ("zero3", "copy"), ("zero2", "mdpo"), ("fsdp", "precomputed")],
)
def test_killed_dpo_run_resumes_exactly(vqa, shapes_dir, tmp_path, straight, kind, reference):
    """A run SIGKILLed mid-way resumes from its newest complete checkpoint (weights, adapters,
    optimizer, schedule, data position, RNG; the copy reference rebuilt, the precomputed one
    reread) and continues the uninterrupted run bitwise."""
    run = tmp_path / "killed"
    kill_after(train_dpo(vqa, shapes_dir, run, kind, reference), run, 3)
    assert list_checkpoints(run / "checkpoints")[-1][0] < STEPS
    assert train_dpo(vqa, shapes_dir, run, kind, reference).wait(timeout=600) == 0
    assert_resumed_exactly(run, straight / f"{kind}-{reference}", STEPS)
