"""The staged VLM task: packed loss equals per-sample losses, text-only batches keep every module
in the step, stage freezing rules, LoRA, init_from, evaluation, generation and export."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import VQA_SUBSETS as SUBSETS
from test_train import metrics, run_cli

from core.data.shards import open_shard
from core.recipe import load_config


def vlm_overrides(vqa: Path, run_dir: Path, steps: int = 10, **extra) -> list[str]:
    over = {
        "run_dir": str(run_dir),
        "model.vision": "",
        "model.vision_config": json.dumps(
            {
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
                "vision_use_head": False,
            }
        ),  # fmt: skip
        "model.text_config.hidden_size": 32,
        "model.text_config.intermediate_size": 64,
        "model.text_config.num_hidden_layers": 2,
        "model.text_config.num_attention_heads": 2,
        "model.text_config.num_key_value_heads": 1,
        "model.tokenizer": str(vqa / "tokenizer"),
        "task.projector.image_tokens": 4,
        "task.trainable": "[]",  # the stage's default, as SiQ-VL (the tiny demo's trains vision)
        "data.train": str(vqa / "{subset}" / "train-*.tar"),
        "data.val": str(vqa / "{subset}" / "val-*.tar"),
        "data.mixture": json.dumps({s: 1 for s in SUBSETS}),
        "data.batch_size": 16,
        "data.num_workers": 0,
        "data.max_seq_len": 128,
        "optim.max_steps": steps,
        "optim.warmup_steps": 2,
        "logging.every": 1,
        "logging.progress": "false",
        "logging.wandb.mode": "disabled",
        "logging.report": "false",  # ~1 s a run; drawn by test_loss_goes_down_and_eval_is_written
        "checkpoint.every": 5,
        "eval.batch_size": 8,
        "eval.evaluators": evaluators(),
    }
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def evaluators(gen_every: int = 0, gen_samples: int = 2, max_new_tokens: int = 4) -> str:
    subsets = ["shapes_colour", "shapes_shape"]
    declared = [{"vqa": {"subsets": subsets, "max_new_tokens": max_new_tokens}},
                {"loss": {"subsets": subsets}}]  # fmt: skip
    if gen_every:
        declared.append({"generation": {"every": gen_every, "samples": gen_samples,
                                        "max_new_tokens": max_new_tokens}})  # fmt: skip
    return json.dumps(declared)


def vlm_task(vqa, tmp_path, **extra):
    from core.tasks import build_task

    torch.manual_seed(0)
    return build_task(load_config("tiny_vlm_stage1", vlm_overrides(vqa, tmp_path / "run", **extra)))


def decoded(task, vqa: Path, subset: str, n: int) -> list[dict]:
    shard = open_shard(str(next((vqa / subset).glob("train-*.tar"))))
    return [task.train_decoder(shard.read(i)) for i in range(n)]


def test_packed_rows_compute_the_same_loss_as_separate_samples(vqa, tmp_path):
    task = vlm_task(vqa, tmp_path).eval()
    samples = decoded(task, vqa, "shapes_colour", 3) + decoded(task, vqa, "shapes_text", 2)
    samples += decoded(task, vqa, "shapes_two_images", 2)
    collate = task.packed_collate()
    packed = collate(samples)
    assert packed["input_ids"].shape[0] < len(samples)  # several samples share a row
    with torch.no_grad():
        total = task(packed).loss  # a sum over supervised tokens
        alone = sum(task(collate([s])).loss for s in samples)
    torch.testing.assert_close(total, alone, rtol=1e-5, atol=1e-5)
    assert task.loss_weight(packed) == sum(task.loss_weight(collate([s])) for s in samples)
    assert packed["supervised_tokens"] == sum(int((s["labels"] != -100).sum()) for s in samples)


def test_text_only_batches_still_run_vision_and_projector(vqa, tmp_path):
    task = vlm_task(vqa, tmp_path)
    calls = []
    task.vision.register_forward_hook(lambda *_: calls.append("vision"))
    batch = task.packed_collate()(decoded(task, vqa, "shapes_text", 4))
    assert batch["pixel_values"].shape[0] == 0
    task(batch).loss.backward()
    assert calls == ["vision"]  # ZeRO-3 / FSDP ranks must gather the same modules
    grads = [p.grad for p in task.projector.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # joined to the loss with weight 0


def test_stages_train_the_right_parameters(vqa, tmp_path):
    def trainable(task):
        return {name.split(".")[0] for name, p in task.named_parameters() if p.requires_grad}

    assert trainable(vlm_task(vqa, tmp_path)) == {"projector"}
    full = vlm_task(vqa, tmp_path, **{"task.stage": "sft"})
    assert trainable(full) == {"projector", "lm"}
    tower_too = vlm_task(
        vqa, tmp_path, **{"task.stage": "sft", "task.trainable": "[vision.*, projector.*, lm.*]"}
    )
    assert trainable(tower_too) == {"vision", "projector", "lm"}
    no_norms = vlm_task(vqa, tmp_path, **{"task.stage": "sft", "task.freeze": "['*norm*']"})
    frozen = [n for n, p in no_norms.named_parameters() if not p.requires_grad]
    assert any("norm" in n for n in frozen) and all(
        "norm" in n or n.startswith("vision.") for n in frozen
    )
    lora = vlm_task(
        vqa, tmp_path, **{"task.stage": "sft", "task.lm_tuning": "lora", "task.lora.r": 4}
    )
    lm_trainable = [n for n, p in lora.lm.named_parameters() if p.requires_grad]
    assert lm_trainable and all("lora_" in n for n in lm_trainable)
    assert not any(p.requires_grad for p in lora.vision.parameters())


def test_bad_projector_settings_are_clear_errors(vqa, tmp_path):
    from core.config import ConfigError

    with pytest.raises(ValueError, match="5 image tokens is not reachable"):
        vlm_task(vqa, tmp_path, **{"task.projector.image_tokens": 5})
    with pytest.raises(ConfigError, match="pixel_shuffle=3 does not divide"):
        vlm_task(vqa, tmp_path, **{"task.projector.pixel_shuffle": 3})
    with pytest.raises(ConfigError, match="lm_tuning=lora needs task.stage=sft"):
        vlm_task(vqa, tmp_path, **{"task.lm_tuning": "lora"})
    with pytest.raises(ConfigError, match=r"task.trainable: 'projektor\.\*' matches no"):
        vlm_task(vqa, tmp_path, **{"task.trainable": "['projektor.*']"})


def test_two_stages_train_evaluate_generate_and_export(vqa, tmp_path):
    """Stage 1 (projector) -> stage 2 (LoRA, init_from stage 1): the loss falls, eval.json has
    VQA accuracy and loss, fixed questions are answered during training, and the export loads
    in transformers and peft with the trained model's outputs; its tokenizer renders chats, its
    image processor gives the training pixels and its generation config generates as vlscale
    does; the model card loads every part, and `vlscale push` uploads the whole export (an
    injected api: no network)."""
    import transformers as hf
    from peft import PeftModel
    from PIL import Image
    from test_export import ATOL, RecordingApi, check_card, png

    from core.loop import train
    from launch.export import consolidated, export
    from launch.push import push

    stage1 = tmp_path / "stage1"
    train(load_config("tiny_vlm_stage1", vlm_overrides(vqa, stage1, 6, **{"optim.lr": 3e-3})))
    stage2 = tmp_path / "stage2"
    over = {
        "task.stage": "sft", "task.lm_tuning": "lora", "task.lora.r": 4, "task.init_from": stage1,
        "optim.lr": 3e-3, "eval.evaluators": evaluators(gen_every=4, gen_samples=2),
    }  # fmt: skip
    result = train(load_config("tiny_vlm_stage2", vlm_overrides(vqa, stage2, 8, **over)))
    losses = [r["loss"] for r in metrics(stage2) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    rows = [r for r in metrics(stage2) if "packing_efficiency" in r]
    assert 0.5 < rows[-1]["packing_efficiency"] <= 1.0
    evaluation = json.loads((stage2 / "eval.json").read_text())
    assert evaluation["num_questions"] == 32  # both val subsets, whole split
    assert {"vqa_acc", "vqa_acc/shapes_colour", "vqa_acc/shapes_shape", "loss"} <= evaluation.keys()
    assert result["vqa_acc"] == evaluation["vqa_acc"]
    generations = (stage2 / "generations.txt").read_text().splitlines()
    assert len(generations) == 4 and generations[0].startswith("step 4\t")

    # stage 2 started from stage 1: its (frozen) vision tower is stage 1's
    s1, s2 = consolidated(stage1)[2], consolidated(stage2)[2]
    assert torch.equal(
        s1["vision.encoder.layers.0.mlp.fc1.weight"], s2["vision.encoder.layers.0.mlp.fc1.weight"]
    )
    assert not torch.equal(s1["projector.proj.weight"], s2["projector.proj.weight"])

    out = export(stage2, tmp_path / "export")
    task = consolidated(stage2)[0].eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = task.lm(ids)
        merged = hf.AutoModelForCausalLM.from_pretrained(out / "lm").eval()
        torch.testing.assert_close(merged(ids).logits, ours, rtol=1e-4, atol=1e-4)
        base = hf.AutoModelForCausalLM.from_pretrained(out / "lm_base")
        adapted = PeftModel.from_pretrained(base, out / "lm_adapter").eval()
        torch.testing.assert_close(adapted(ids).logits, ours, rtol=1e-4, atol=1e-4)
    assert (out / "vision" / "config.json").exists() and (out / "projector.safetensors").exists()

    # what transformers needs besides the weights (core/export.py; details in test_export.py)
    turns = [{"user": "What colour is the square?", "assistant": "red"}]
    chat = [{"role": "user", "content": turns[0]["user"]}, {"role": "assistant", "content": "red"}]
    for name in ("lm", "lm_base"):
        tok = hf.AutoTokenizer.from_pretrained(out / name)
        text = tok.apply_chat_template(chat, tokenize=False)
        assert text == task.tokenizer.decode(task.processor.encode(turns, 0)[0])
        generation = hf.GenerationConfig.from_pretrained(out / name)
        assert (
            generation.eos_token_id
            == task.end_of_turn_id
            == tok.convert_tokens_to_ids("<|im_end|>")
        )
        assert generation.pad_token_id == task.tokenizer.pad_token_id
        assert generation.max_new_tokens == 128 and not generation.do_sample  # data.max_seq_len
    prompt = torch.tensor([task.processor.prompt(turns, 0)])
    size = task.vision.image_size
    most = generation.max_new_tokens
    with torch.no_grad():  # the exported config alone: greedy to <|im_end|>, as vlscale's
        theirs = merged.generate(prompt, generation_config=generation)
        theirs = theirs[0, prompt.shape[1] :].tolist()
        ours = task.generate_tokens(prompt, torch.ones_like(prompt), torch.zeros(0, 3, size, size),
                                    max_new_tokens=most)[0].tolist()  # fmt: skip
    assert theirs == ours[: len(theirs)]
    assert len(theirs) == most or theirs[-1] == task.end_of_turn_id
    processor = hf.AutoImageProcessor.from_pretrained(out / "vision", backend="pil")
    data = png(48, 40)  # resized to size x size, no crop
    pixels = processor(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, task.eval_decoder.load_image(data), rtol=0, atol=ATOL)
    check_card(out, "vlm", {"vision-language", "lora"}, evaluation)

    api = RecordingApi()
    push(out, "user/tiny-vlm", api=api)  # an export: uploaded as it is
    assert api.uploaded == {str(p.relative_to(out)): p.read_bytes()
                            for p in out.rglob("*") if p.is_file()}  # fmt: skip
    assert {"README.md", "projector.safetensors", "vision/preprocessor_config.json",
            "lm/tokenizer_config.json", "lm/generation_config.json",
            "lm_adapter/adapter_config.json"} <= api.uploaded.keys()  # fmt: skip


def test_generate_cli_answers_as_the_training_time_evaluation(vqa, tmp_path):
    """`vlscale generate` (a task rebuilt from the checkpoint) gives the training loop's own
    answers to the same validation questions, batched; beams and sampling run too."""
    import ast

    from core.data.synthetic import vqa_conversation, vqa_row
    from core.loop import train
    from core.tasks import build_task
    from launch.export import consolidated
    from launch.generate import answer

    run = tmp_path / "run"
    train(load_config("tiny_vlm_stage1", vlm_overrides(vqa, run, 2, **{
        "eval.evaluators": evaluators(gen_every=2, gen_samples=4, max_new_tokens=5),
    })))  # fmt: skip
    logged = {}  # key -> the answer logged at step 2
    for line in (run / "generations.txt").read_text().splitlines():
        _, key, prediction, _ = line.split("\t")
        logged[key] = ast.literal_eval(prediction)
    items = []
    for key in logged:  # <subset>-val-<row>: the row the val shard was converted from
        subset, _, row = key.rpartition("-val-")
        image = tmp_path / f"{key}.jpg"
        image.write_bytes(vqa_row(subset, 0, "val", int(row), 32)["images"][0])
        items.append((vqa_conversation(subset, 0, "val", int(row))[1][0]["user"], [image]))
    task, cfg, _ = consolidated(run)  # built on the meta device, then filled
    with torch.no_grad():
        answers = answer(task.eval(), items, torch.device("cpu"), max_new_tokens=5)
    assert answers == list(logged.values())
    # A random LM answers alike whatever it sees; the pixels must match too.
    data = items[0][1][0].read_bytes()
    assert torch.equal(
        task.eval_decoder.load_image(data), build_task(cfg).eval_decoder.load_image(data)
    )

    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({"prompt": p, "images": [str(i) for i in images]}) + "\n"
                             for p, images in items))  # fmt: skip
    for extra in ([], ["--num-beams", "3"], ["--sample", "--temperature", "0.7", "--top-p", "0.9"]):
        done = run_cli(["generate", str(run), "--batch", str(batch), "--max-new-tokens", "5",
                        *extra], stdout=subprocess.PIPE, text=True)  # fmt: skip
        out, _ = done.communicate(timeout=300)
        assert done.returncode == 0, out
        assert out.count("-> ") == len(items)


def test_accumulated_micro_batches_weigh_every_token_equally(vqa, tmp_path):
    """Two micro-batches with different numbers of supervised tokens, accumulated by the loop's
    train_step, give the gradient of the token mean over both: the same as one batch of all."""
    from core.distributed import DistInfo
    from core.loop import train_step

    class Engine:  # the engine protocol, on one process
        def __init__(self, task):
            self.task = task

        def forward_backward(self, batch, loss_scale, sync):
            out = self.task(batch)
            (out.loss * loss_scale).backward()
            return out

        def step(self, loss_is_finite):
            return 0.0, True

    task = vlm_task(vqa, tmp_path, **{"task.stage": "sft"})
    short = decoded(task, vqa, "shapes_colour", 6)
    long = decoded(task, vqa, "shapes_caption", 2)
    collate = task.packed_collate()
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    result = train_step(task, Engine(task), iter([collate(short), collate(long)]), 2, dist)
    accumulated = [p.grad.clone() for p in task.parameters() if p.requires_grad]
    task.zero_grad()
    batch = collate(short + long)
    whole = task(batch).loss / task.loss_weight(batch)  # the token mean, computed directly
    whole.backward()
    for a, b in zip(accumulated, [p.grad for p in task.parameters() if p.requires_grad]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert abs(result.loss - whole.item()) < 1e-5
