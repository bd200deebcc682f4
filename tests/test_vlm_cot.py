"""Chain-of-thought SFT (the staged VLM's stage 3, `data.cot_format`): the supervised labels are
exactly the rendered reasoning + answer + end-of-turn token for real chat templates, templates
that cannot render the reasoning are clear errors, the reasoning / answer loss split equals a
hand computation on packed rows, over-long samples are skipped and counted (never truncated), a
tiny stage 3 trains from a stage-2 run, and the `cot` evaluator's parsing and scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_chat_templates import FAMILIES, SYSTEM, family_tokenizer
from test_train import metrics
from test_vlm_task import vlm_overrides, vlm_task

from core.data.chat import IGNORE, ChatProcessor
from core.data.cot import (
    ANSWER,
    NO_KIND,
    REASONING,
    CoTProcessor,
    parse_output,
    render_target,
)
from core.data.errors import BadSample
from core.data.shards import open_shard
from core.distributed import DistInfo
from core.evaluators.cot import cot_scores

PER_IMAGE = 3
RECORD = {
    "question": "How many red shapes are there?",
    "reasoning": "I see a red circle and a blue square.\n\nOnly the circle is red.",
    "answer": "one",
    "reasoning_parts": {
        "summary": "I will count the red shapes.",
        "caption": "A red circle and a blue square.",
        "reasoning": "Only the circle is red.",
    },
}
# The targets written out by hand (core/data/cot.py's formats).
TARGETS = {
    "think": "<think>\nI see a red circle and a blue square.\n\nOnly the circle is red.\n</think>"
    "\n\none",
    "llava_cot": "<SUMMARY> I will count the red shapes. </SUMMARY>\n\n<CAPTION> A red circle and "
    "a blue square. </CAPTION>\n\n<REASONING> Only the circle is red. </REASONING>\n\n"
    "<CONCLUSION> one </CONCLUSION>",
}
TEMPLATES = ["qwen2.5", "qwen3", "llama3", "gemma", "smollm2"]
ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def thinking(name: str, fmt: str) -> dict:
    """The template arguments each case needs: Qwen3 renders the think format only with
    thinking enabled (its generation prompt is then the bare assistant header), and LLaVA-CoT's
    only without (its empty think block is then part of the generation prompt)."""
    return {"enable_thinking": not (name == "qwen3" and fmt == "llava_cot")}


def cot_processor(name: str, fmt: str, tmp_path: Path, kwargs: dict | None = None):
    texts = [TARGETS["think"], TARGETS["llava_cot"], RECORD["question"]] * 20
    tok = family_tokenizer(name, tmp_path / f"{name}-{fmt}", texts=texts)
    system = FAMILIES[name].get("system", SYSTEM)
    chat = ChatProcessor(tok, PER_IMAGE, system, thinking(name, fmt) if kwargs is None else kwargs)
    return tok, system, CoTProcessor(chat, fmt)


def messages(system, images: int, answer: str | None = None) -> list[dict]:
    """The conversation as a transformers user writes it: images as their pad tokens."""
    block = "<|vision_start|>" + "<|image_pad|>" * PER_IMAGE + "<|vision_end|>"
    out = [{"role": "system", "content": system}] if system else []
    out.append({"role": "user", "content": block * images + RECORD["question"]})
    return out + ([{"role": "assistant", "content": answer}] if answer is not None else [])


# ------------------------------------------------------------------ labels
@pytest.mark.parametrize("fmt", ["think", "llava_cot"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_supervised_labels_decode_to_exactly_the_target(name, fmt, tmp_path):
    tok, system, cot = cot_processor(name, fmt, tmp_path)
    assert render_target(fmt, RECORD).text == TARGETS[fmt]
    ids, labels, kinds = cot.encode(RECORD, 1)
    kwargs = thinking(name, fmt)
    # the ids are the template's own rendering of the conversation, tokenised once
    rendered = tok.apply_chat_template(messages(system, 1, TARGETS[fmt]), tokenize=True,
                                       return_dict=False, **kwargs)  # fmt: skip
    assert ids == rendered
    # everything before the target is exactly the generation prompt, and none of it is supervised
    prompt = tok.apply_chat_template(messages(system, 1), tokenize=True, return_dict=False,
                                     add_generation_prompt=True, **kwargs)  # fmt: skip
    first = next(j for j, label in enumerate(labels) if label != IGNORE)
    assert ids[:first] == prompt == cot.prompt(RECORD["question"], 1)
    # the supervised tokens are one run that decodes to the target and the end-of-turn token
    supervised = [label for label in labels if label != IGNORE]
    assert supervised == ids[first : first + len(supervised)]
    assert tok.decode(supervised) == TARGETS[fmt] + FAMILIES[name]["end"]
    assert supervised[-1] == tok.convert_tokens_to_ids(FAMILIES[name]["end"])
    # kinds: every supervised token has one; the answer's are the answer text and end of turn
    assert [k != NO_KIND for k in kinds] == [label != IGNORE for label in labels]
    answer = [i for i, k in zip(ids, kinds) if k == ANSWER]
    assert tok.decode(answer).strip() == "one" + FAMILIES[name]["end"]
    reasoning = tok.decode([i for i, k in zip(ids, kinds) if k == REASONING])
    assert RECORD["reasoning_parts"]["reasoning"] in reasoning and "one" not in reasoning


def test_qwen3_renders_the_think_format_only_with_thinking_enabled(tmp_path):
    """Qwen3's template moves `<think>` reasoning out of the content and writes it back; with
    enable_thinking false its generation prompt is an empty think block that the reasoning
    would follow: the model would learn a turn it is never prompted for."""
    with pytest.raises(ValueError, match="enable_thinking: true"):
        cot_processor("qwen3", "think", tmp_path, {"enable_thinking": False})
    with pytest.raises(ValueError, match="keep enable_thinking: false"):
        cot_processor("qwen3", "llava_cot", tmp_path, {"enable_thinking": True})


def test_templates_that_drop_or_rewrite_the_reasoning_are_clear_errors(tmp_path):
    """A template that drops reasoning from assistant turns (DeepSeek-R1's keeps only what
    follows `</think>`) or rewrites it (blank lines squeezed) cannot train the format: an error,
    not a run that silently trains something else."""
    tok, *_ = cot_processor("qwen2.5", "think", tmp_path)
    base = "{{ '<|im_start|>' + message['role'] + '\\n' + CONTENT + '<|im_end|>\\n' }}"
    for content in ("message['content'].split('</think>')[-1]",  # R1: the answer alone
                    "message['content'].replace('\\n\\n', '\\n')"):  # fmt: skip
        tok.chat_template = (
            "{% for message in messages %}" + base.replace("CONTENT", content) + "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        )
        with pytest.raises(ValueError, match="cannot train data.cot_format=think"):
            CoTProcessor(ChatProcessor(tok, PER_IMAGE, SYSTEM), "think")


def test_unusable_cot_samples_are_bad_samples(tmp_path):
    _, _, think = cot_processor("qwen3", "think", tmp_path)
    _, _, llava = cot_processor("qwen2.5", "llava_cot", tmp_path)

    def reason(cot, **changes):
        with pytest.raises(BadSample) as bad:
            cot.encode({**RECORD, **changes}, 1)
        return bad.value.reason

    assert reason(think, reasoning="x </think> y") == "tag_in_text"
    assert reason(llava, answer="<CONCLUSION> one") == "tag_in_text"
    assert reason(think, reasoning="end <|im_end|>") == "special_token_in_text"
    assert reason(think, question="<|im_start|>") == "special_token_in_text"
    assert reason(think, answer="  ") == "empty_answer"
    assert reason(think, reasoning="") == "empty_reasoning"
    assert reason(think, question=" ") == "empty_question"
    assert reason(llava, reasoning_parts=None) == "no_reasoning_parts"  # an R1-format sample
    assert reason(think, answer=None) == "missing_answer"


# ------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def cot_shards(tmp_path_factory) -> Path:
    """Synthetic shapes chains of thought in LLaVA-CoT-100k's layout, converted as the real
    dataset is: <root>/shards/{train,val}-*.tar (about 77 / 19 samples); src/train.jsonl."""
    from core.data.preference_sources import convert_llava_cot
    from core.data.synthetic import write_llava_cot_jsonl

    root = tmp_path_factory.mktemp("cot")
    jsonl = write_llava_cot_jsonl(root / "src", rows=96, seed=0, image_size=32)
    result = convert_llava_cot([jsonl], root / "src", root / "shards", val_fraction=0.2,
                               shard_size=32)  # fmt: skip
    assert result["skipped"] == {} and result["train"] + result["val"] == 96 and result["val"]
    return root / "shards"


def cot_overrides(shards: Path, **extra) -> dict:
    return {
        "data.train": str(shards / "train-*.tar"),
        "data.val": str(shards / "val-*.tar"),
        "data.mixture": "{}",
        "data.cot_format": "think",
        "data.max_seq_len": 512,
        "eval.evaluators": "[]",
        **extra,
    }


def shard_samples(shards: Path, split: str = "train") -> list[dict]:
    samples = []
    for path in sorted(shards.glob(f"{split}-*.tar")):
        shard = open_shard(str(path))
        samples += [shard.read(i) for i in range(len(shard))]
    return samples


def test_cli_synthetic_cot_then_llava_cot(tmp_path, capsys):
    """The README's commands: synthetic rows in LLaVA-CoT's layout, converted to CoT shards."""
    from launch.cli import main

    src, out = tmp_path / "src", tmp_path / "cot"
    assert main(["shards", "synthetic-cot", "--out", str(src), "--rows", "5"]) == 0
    assert len((src / "train.jsonl").read_text().splitlines()) == 5
    assert len(list((src / "images").glob("*.jpg"))) == 5
    argv = ["shards", "llava-cot", "--source", str(src / "train.jsonl"), "--images", str(src),
            "--out", str(out), "--val-fraction", "0"]  # fmt: skip
    assert main(argv) == 0
    assert "5 train, 0 val samples from 5 rows, 5 turns" in capsys.readouterr().out
    record = json.loads(shard_samples(out)[0]["json"])
    assert record["question"].startswith("How many ") and record["reasoning_parts"]["caption"]


def test_converted_synthetic_rows_render_as_the_dataset_wrote_them(cot_shards):
    """The converter's record, rendered in the llava_cot format, is the jsonl row's answer:
    nothing lost between LLaVA-CoT's layout, the shards and the training target."""
    rows = [json.loads(line) for line in
            (cot_shards.parent / "src" / "train.jsonl").read_text().splitlines()]  # fmt: skip
    for sample in shard_samples(cot_shards)[:8]:
        record = json.loads(sample["json"])
        written = rows[record["row"]]["conversations"][1]["value"]
        assert render_target("llava_cot", record).text == written


def test_reasoning_and_answer_losses_match_a_hand_computation(vqa, cot_shards, tmp_path):
    """Packed rows of several samples: the task's loss is the sum of every supervised token's
    loss, reasoning_loss / answer_loss the mean over the tokens of each kind, against each sample
    run alone (causal mask, no packing) and its loss computed by hand from the logits."""
    task = vlm_task(vqa, tmp_path, **cot_overrides(cot_shards)).eval()
    samples = [task.train_decoder(raw) for raw in shard_samples(cot_shards)[:6]]
    batch = task.packed_collate()(samples)
    assert batch["input_ids"].shape[0] < len(samples)  # samples share rows
    with torch.no_grad():
        out = task(batch)
        by_kind = {REASONING: [], ANSWER: []}
        for s in samples:
            ids = s["input_ids"][None]
            logits = task.lm(inputs_embeds=task.input_embeddings(ids, s["pixel_values"]))[0]
            log_p = torch.log_softmax(logits.double(), dim=-1)
            for t in range(len(ids[0]) - 1):
                target = int(s["labels"][t + 1])
                if target != IGNORE:
                    by_kind[int(s["label_kinds"][t + 1])].append(-float(log_p[t, target]))
    every = by_kind[REASONING] + by_kind[ANSWER]
    assert len(every) == batch["supervised_tokens"]
    assert len(by_kind[ANSWER]) == 2 * len(samples)  # "one"/"two"/"three" and <|im_end|> here
    assert math.isclose(float(out.loss), sum(every), rel_tol=1e-5)
    for name, kind in (("reasoning_loss", REASONING), ("answer_loss", ANSWER)):
        expected = sum(by_kind[kind]) / len(by_kind[kind])
        assert math.isclose(float(out.metrics[name]), expected, rel_tol=1e-5), name


def test_over_long_samples_are_skipped_and_counted_never_truncated(vqa, cot_shards, tmp_path):
    raw = shard_samples(cot_shards, "val")
    roomy = vlm_task(vqa, tmp_path, **cot_overrides(cot_shards))
    decoded = [roomy.train_decoder(sample) for sample in raw]
    lengths = sorted(len(s["input_ids"]) for s in decoded)
    limit = lengths[len(lengths) // 2]  # about half the samples are longer
    fitting = [s for s in decoded if len(s["input_ids"]) <= limit]
    assert 0 < len(fitting) < len(decoded)

    task = vlm_task(vqa, tmp_path, **cot_overrides(cot_shards, **{
        "data.max_seq_len": limit, "data.max_bad_fraction": 1.0}))  # fmt: skip
    with pytest.raises(BadSample, match="too_long"):
        task.train_decoder(next(r for r, s in zip(raw, decoded) if len(s["input_ids"]) > limit))
    stream = task.val_stream(ONE_RANK, batch_size=4)
    batches = list(stream)
    assert stream.stats()["skipped/too_long"] == len(decoded) - len(fitting)
    assert sum(b["num_samples"] for b in batches) == len(fitting)
    # what is delivered is whole: every fitting sample's supervised tokens, none cut
    assert sum(b["supervised_tokens"] for b in batches) == sum(
        int((s["labels"][1:] != IGNORE).sum()) for s in fitting
    )


# ------------------------------------------------------------------ training and evaluation
def test_tiny_stage3_trains_from_a_stage2_run(vqa, cot_shards, tmp_path):
    """tiny_vlm_stage3 (init_from a stage-2 run, CoT shards in the think format) trains on one
    process: the loss falls, reasoning and answer losses are logged, and the cot evaluator
    writes its scores and samples."""
    from core.loop import train
    from core.recipe import load_config

    stage2 = tmp_path / "stage2"
    train(load_config("tiny_vlm_stage2", vlm_overrides(vqa, stage2, 2, **{
        "task.init_from": "", "eval.evaluators": "[]"})))  # fmt: skip
    stage3 = tmp_path / "stage3"
    evaluators = [{"cot": {"max_new_tokens": 24, "samples": 2}}, "loss"]
    over = cot_overrides(cot_shards, **{
        "task.init_from": str(stage2), "optim.lr": 1e-2, "data.interleave": 1,
        "eval.evaluators": json.dumps(evaluators), "eval.batch_size": 32})  # fmt: skip
    result = train(load_config("tiny_vlm_stage3", vlm_overrides(vqa, stage3, 20, **over)))
    rows = [r for r in metrics(stage3) if "loss" in r]
    assert len(rows) == 20
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3])  # about 0.5 in 20 steps
    assert all(r["reasoning_loss"] > 0 and r["answer_loss"] > 0 for r in rows)
    evaluation = json.loads((stage3 / "eval.json").read_text())
    assert {"cot_format_ok", "cot_acc", "num_questions", "loss"} <= evaluation.keys()
    assert evaluation["num_questions"] == len(shard_samples(cot_shards, "val"))
    assert result["cot_acc"] == evaluation["cot_acc"]
    lines = (stage3 / "cot_generations.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 20\t")


THINK_CASES = [
    ("<think>\nI see one red circle.\n</think>\n\nOne.", "One."),
    ("<think>a</think>two", "two"),
    ("  <think>\nx\n</think>\n\n  three  \n", "three"),
    ("<think>\nI see one red circle.", None),  # not closed (cut off by max_new_tokens)
    ("one", None),  # no reasoning
    ("<think>\n\n</think>\n\none", None),  # empty reasoning
    ("<think>a</think>\n\n", None),  # no answer
    ("<think>a</think>b</think>c", None),  # a second closing tag
    ("<think>a<think>b</think>c", None),  # a nested opening tag
    ("so: <think>a</think>b", None),  # text before the reasoning
    ("</think>a<think>b", None),  # out of order
]
LLAVA = "<SUMMARY> s </SUMMARY>\n\n<CAPTION> c </CAPTION>\n\n<REASONING> r </REASONING>\n\n"
LLAVA_CASES = [
    (LLAVA + "<CONCLUSION> Two </CONCLUSION>", "Two"),
    (LLAVA.replace("\n\n", "") + "<CONCLUSION>B</CONCLUSION>\n", "B"),
    (LLAVA + "<CONCLUSION> Two", None),  # not closed
    (LLAVA + "Two", None),  # no conclusion
    (LLAVA.replace("<CAPTION> c </CAPTION>", "") + "<CONCLUSION> Two </CONCLUSION>", None),
    ("<CAPTION> c </CAPTION>\n\n<SUMMARY> s </SUMMARY>\n\n<REASONING> r </REASONING>\n\n"
     "<CONCLUSION> Two </CONCLUSION>", None),  # out of order
    (LLAVA + "<CONCLUSION>  </CONCLUSION>", None),  # empty answer
    (LLAVA + "<CONCLUSION> Two </CONCLUSION> extra", None),  # text after the tags
    (LLAVA + "<CONCLUSION> a <CONCLUSION> b </CONCLUSION>", None),  # a repeated tag
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "output", "answer"),
                         [("think", *c) for c in THINK_CASES]
                         + [("llava_cot", *c) for c in LLAVA_CASES])  # fmt: skip
def test_outputs_comply_and_answers_are_extracted_by_hand(fmt, output, answer):
    assert parse_output(fmt, output) == answer


def test_cot_scores_are_the_hand_counts():
    records = [
        ("a", "s1", "<think>r</think>Two.", "two"),  # compliant, right (case, punctuation)
        ("b", "s1", "<think>r</think>three", "two"),  # compliant, wrong
        ("c", "s2", "two", "two"),  # right words, not in the format: scores 0
        ("d", "s2", "<think>r", "one"),  # cut off
    ]
    scores = cot_scores(records, "think")
    assert scores == {"cot_format_ok": 0.5, "cot_acc": 0.25, "num_questions": 4,
                      "cot_acc/s1": 0.5, "cot_acc/s2": 0.0}  # fmt: skip
    with pytest.raises(ValueError, match="duplicate key"):
        cot_scores(records + records[:1], "think")


def test_the_cot_evaluator_needs_a_cot_task(vqa, tmp_path):
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="set data.cot_format"):
        vlm_task(vqa, tmp_path, **{"eval.evaluators": json.dumps(["cot"])})


def test_the_vqa_evaluator_asks_other_shards_and_scores_the_extracted_answers(
    vqa, cot_shards, tmp_path, monkeypatch
):
    """Stage 2's questions asked of a CoT model: the FineVision shards given as `data` (not the
    task's own CoT val split), decoded as stage 2 decodes them, and each output's extracted
    answer scored; an output out of the format is scored as it is."""
    from core.evaluators import EvalContext, build_evaluators

    task = vlm_task(vqa, tmp_path, **cot_overrides(cot_shards)).eval()
    data = str(vqa / "{subset}" / "val-*.tar")
    asked = []

    def generate(batch, max_new_tokens, **options):
        asked.extend(zip(batch["key"], batch["answer"]))
        # the first question of every batch answered in the format, right; the others "red",
        # out of the format (the whole output is then the prediction)
        return ([f"<think>\nlooked\n</think>\n\n{batch['answer'][0]}"]
                + ["red"] * (len(batch["key"]) - 1))  # fmt: skip

    monkeypatch.setattr(task, "generate", generate)
    ctx = EvalContext(task.cfg, DistInfo(0, 1, 0, torch.device("cpu")), 0, tmp_path)
    ctx.cfg.eval.batch_size = 4
    (evaluator,) = build_evaluators([{"vqa": {"data": data, "subsets": ["shapes_colour"]}}], task)
    got = evaluator(task, ctx)
    rows = open_shard(str(vqa / "shapes_colour" / "val-000000.tar"))
    answers = [json.loads(rows.read(i)["json"])["texts"][0]["assistant"] for i in range(len(rows))]
    assert sorted(a for _, a in asked) == sorted(answers)  # stage 2's questions, each once
    firsts = list(range(0, len(answers), 4))
    expected = len(firsts) + sum(a == "red" for i, a in enumerate(answers) if i not in firsts)
    assert got["num_questions"] == len(answers)
    assert got["answer_extracted"] == len(firsts) / len(answers)
    assert got["vqa_acc"] == pytest.approx(expected / len(answers))
