"""RLAIF-V and LLaVA-CoT(-R1) -> shards: tiny local files in the public datasets' layouts
(parquet written with `datasets`, jsonl, image files), converted, read back with tarfile and
checked field by field; malformed rows counted and skipped; the CLI subcommands."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image

from core.data.errors import BadSample
from core.data.preference_sources import (
    COT_FIELDS,
    LLAVA_COT_R1_REPO,
    LLAVA_COT_REPO,
    PREFERENCE_FIELDS,
    RLAIF_V_FORMATTED_REPO,
    RLAIF_V_REPO,
    convert_llava_cot,
    convert_rlaif_v,
    cot_fields,
    parse_llava_cot,
    parse_r1,
    preference_fields,
)
from core.data.shards import read_sizes
from core.data.synthetic import make_sample
from launch.cli import main as cli


def image(fmt="JPEG", colour=(200, 30, 30), size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def read_back(directory) -> dict[str, dict[str, dict[str, bytes]]]:
    """{split: {key: {ext: bytes}}} of every shard sizes.json lists, read with tarfile; checks
    sizes.json against the tars."""
    out: dict[str, dict] = {"train": {}, "val": {}}
    for name, count in read_sizes(directory).items():
        split = name.split("-")[0]
        samples: dict[str, dict] = {}
        with tarfile.open(directory / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        assert len(samples) == count
        out[split].update(samples)
    assert sorted(p.name for p in directory.glob("*.tar")) == sorted(read_sizes(directory))
    return out


def image_ext(fields: dict) -> str:
    (ext,) = [e for e in fields if e != "json"]
    return ext


# ------------------------------------------------------------------ RLAIF-V
RLAIF_V_FEATURES = Features(
    {
        "ds_name": Value("string"),
        "image": ImageFeature(),
        "question": Value("string"),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "origin_dataset": Value("string"),
        "origin_split": Value("string"),
        "idx": Value("string"),
        "image_path": Value("string"),
    }
)  # openbmb/RLAIF-V-Dataset's card (dataset_info.features)


def rlaif_v_row(i, question, chosen, rejected, data) -> dict:
    return {
        "ds_name": "RLAIF-V",
        "image": {"bytes": data, "path": None},
        "question": question,
        "chosen": chosen,
        "rejected": rejected,
        "origin_dataset": "VQAv2",
        "origin_split": json.dumps({"model": "OmniLMM-12B", "type": "question_answering"}),
        "idx": f"idx-{i}",
        "image_path": f"coco/{i}.jpg",
    }


def write_parquet(rows: list[dict], features: Features, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: [row[name] for row in rows] for name in features}
    Dataset.from_dict(columns, features=features).to_parquet(str(path))


RED, BLUE = image(), image("PNG", (30, 30, 200))
BMP = image("BMP", (10, 160, 10))
RLAIF_V_ROWS = [  # (question, chosen, rejected, image, why skipped or None)
    ("What is in the image?", "A red rectangle.", "A blue circle.", RED, None),
    ("<image>\nWhat colour is it?", " Blue. ", "Green.", BLUE, None),
    ("Describe the image.", "A red shape on its own.", "Two shapes.", RED, None),
    ("Which colour?", "Green.", "Red.", BMP, None),
    ("Same answers?", "Yes.", "Yes.", RED, "same_responses"),
    ("Broken image?", "a", "b", b"not an image", "bad_image"),
    ("No chosen?", "  ", "b", RED, "empty_response"),
    ("What is <image> this?", "a", "b", RED, "image_token_in_text"),
    ("A second file.", "First.", "Second.", BLUE, None),
]


@pytest.fixture(scope="module")
def rlaif_v_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlaif_v")
    rows = [rlaif_v_row(i, *r[:4]) for i, r in enumerate(RLAIF_V_ROWS)]
    # the hub repo's file names; two files, read in order as one pool
    write_parquet(rows[:8], RLAIF_V_FEATURES, root / "RLAIF-V-Dataset_000.parquet")
    write_parquet(rows[8:], RLAIF_V_FEATURES, root / "RLAIF-V-Dataset_001.parquet")
    return root


def test_rlaif_v_rows_become_preference_samples(rlaif_v_dir, tmp_path):
    result = convert_rlaif_v([rlaif_v_dir], tmp_path / "out", shard_size=2)
    skipped = [r[4] for r in RLAIF_V_ROWS if r[4]]
    assert result == {
        "train": len(RLAIF_V_ROWS) - len(skipped),
        "val": 0,
        "rows": len(RLAIF_V_ROWS),
        "skipped": {reason: skipped.count(reason) for reason in sorted(skipped)},
    }
    samples = read_back(tmp_path / "out")["train"]
    assert not read_back(tmp_path / "out")["val"]
    kept = [i for i, r in enumerate(RLAIF_V_ROWS) if r[4] is None]
    assert sorted(samples) == [f"rlaif_v-train-{i:09d}" for i in kept]
    for i in kept:
        question, chosen, rejected, data, _ = RLAIF_V_ROWS[i]
        fields = samples[f"rlaif_v-train-{i:09d}"]
        record = json.loads(fields["json"])
        assert record == {
            "prompt": question.removeprefix("<image>\n"),
            "chosen": chosen.strip(),
            "rejected": rejected,
            "source": RLAIF_V_REPO,
            "num_images": 1,
            "ds_name": "RLAIF-V",
            "origin_dataset": "VQAv2",
            "origin_split": '{"model": "OmniLMM-12B", "type": "question_answering"}',
            "idx": f"idx-{i}",
            "image_path": f"coco/{i}.jpg",
        }
        ext = image_ext(fields)
        if data is BMP:  # neither jpg, png nor webp: re-encoded losslessly
            assert ext == "png"
            assert (
                Image.open(io.BytesIO(fields[ext])).tobytes()
                == Image.open(io.BytesIO(BMP)).tobytes()
            )
        else:  # the source's own bytes
            assert (ext, fields[ext]) == ("jpg" if data is RED else "png", data)


MESSAGES = List(
    {"content": List({"text": Value("string"), "type": Value("string")}), "role": Value("string")}
)
FORMATTED_FEATURES = Features(
    {"chosen": MESSAGES, "rejected": MESSAGES, "images": List(ImageFeature()), "prompt": MESSAGES}
)  # HuggingFaceH4/rlaif-v_formatted's card


def formatted_row(prompt_parts, chosen, rejected, images, chosen_role="assistant") -> dict:
    def reply(text, role="assistant"):
        return [{"content": [{"text": text, "type": "text"}], "role": role}]

    return {
        "prompt": [{"content": prompt_parts, "role": "user"}],
        "chosen": reply(chosen, chosen_role),
        "rejected": reply(rejected),
        "images": [{"bytes": b, "path": None} for b in images],
    }


def test_rlaif_v_formatted_layout(tmp_path):
    question = [{"text": None, "type": "image"}, {"text": "What is shown?", "type": "text"}]
    rows = [
        formatted_row(question, "A rectangle.", "A circle.", [RED]),
        formatted_row(question, "Two.", "One.", [RED, BLUE]),  # image_count
        formatted_row(question[1:], "Two.", "One.", [RED]),  # no image part: bad_messages
        formatted_row(question, "Two.", "One.", [BLUE], chosen_role="user"),  # bad_messages
        formatted_row(
            [*question, {"text": "Answer briefly.", "type": "text"}], "Blue.", "Red.", [BLUE]
        ),
    ]
    write_parquet(rows, FORMATTED_FEATURES, tmp_path / "data" / "train-00000-of-00001.parquet")
    result = convert_rlaif_v([tmp_path / "data" / "train-00000-of-00001.parquet"], tmp_path / "o")
    assert result == {
        "train": 2, "val": 0, "rows": 5, "skipped": {"bad_messages": 2, "image_count": 1}
    }  # fmt: skip
    samples = read_back(tmp_path / "o")["train"]
    first, last = samples["rlaif_v-train-000000000"], samples["rlaif_v-train-000000004"]
    assert json.loads(first["json"]) == {
        "prompt": "What is shown?",
        "chosen": "A rectangle.",
        "rejected": "A circle.",
        "source": RLAIF_V_FORMATTED_REPO,
        "num_images": 1,
    }
    assert first["jpg"] == RED and last["png"] == BLUE
    assert json.loads(last["json"])["prompt"] == "What is shown?\nAnswer briefly."


def test_val_holds_out_whole_images(tmp_path):
    """Many pairs per image (as RLAIF-V has): an image's pairs all land on one side."""
    images = [image(colour=(20 * i, 100, 50)) for i in range(8)]
    rows = [
        rlaif_v_row(3 * i + k, f"Question {k}?", f"Right {k}.", f"Wrong {k}.", data)
        for i, data in enumerate(images)
        for k in range(3)
    ]
    write_parquet(rows, RLAIF_V_FEATURES, tmp_path / "src" / "a.parquet")
    result = convert_rlaif_v([tmp_path / "src"], tmp_path / "o", val_fraction=0.5)
    assert result["train"] + result["val"] == 24 and result["train"] and result["val"]
    shards = read_back(tmp_path / "o")
    side = {}
    for split, samples in shards.items():
        for fields in samples.values():
            assert side.setdefault(fields["jpg"], split) == split
    assert len(side) == 8
    # the same conversion again: the same shards, byte for byte
    again = convert_rlaif_v([tmp_path / "src"], tmp_path / "o2", val_fraction=0.5)
    assert again == result
    for path in (tmp_path / "o").iterdir():
        assert path.read_bytes() == (tmp_path / "o2" / path.name).read_bytes()


def test_reconverting_into_fewer_shards_removes_the_old_ones(rlaif_v_dir, tmp_path):
    convert_rlaif_v([rlaif_v_dir], tmp_path / "o", shard_size=1)
    assert len(list((tmp_path / "o").glob("train-*.tar"))) == 5
    convert_rlaif_v([rlaif_v_dir], tmp_path / "o", shard_size=100)
    assert read_sizes(tmp_path / "o") == {"train-000000.tar": 5}
    assert len(read_back(tmp_path / "o")["train"]) == 5


# ------------------------------------------------------------------ LLaVA-CoT
SUMMARY = "I will look at the map and compare latitudes."
CAPTION = "A map of the United States with Montana and Texas highlighted."
REASONING = "Montana borders Canada; Texas borders Mexico. So Montana is farther north."


def llava_cot_answer(summary=SUMMARY, caption=CAPTION, reasoning=REASONING, conclusion="A"):
    # the released rows pad each section with blank lines
    return (
        f"<SUMMARY>\n\n{summary}\n\n</SUMMARY>\n\n<CAPTION>\n\n{caption}\n\n</CAPTION>\n\n"
        f"<REASONING>\n\n{reasoning}\n\n</REASONING>\n\n<CONCLUSION>\n\n{conclusion}\n\n"
        "</CONCLUSION>"
    )


def conversation(*turns) -> list[dict]:
    out = []
    for question, answer in turns:
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


QUESTION = "Which of these states is farthest north?\nA. Montana\nB. Texas"
ANSWER = llava_cot_answer()
IMAGES = {  # relative paths as LLaVA-CoT-100k's rows give them
    "sqa/train/20839/image.png": image("PNG", (240, 240, 240)),
    "chartqa/train/png/two_col_1.png": image("PNG", (10, 10, 10)),
    "coco/train2017/000000000009.jpg": image("JPEG", (90, 60, 30)),
}


@pytest.fixture
def images_dir(tmp_path):
    for relative, data in IMAGES.items():
        path = tmp_path / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return tmp_path / "images"


def test_llava_cot_rows_become_cot_samples(tmp_path, images_dir):
    chart = "chartqa/train/png/two_col_1.png"
    lines = [
        {"id": "sqa-1", "image": "sqa/train/20839/image.png",
         "conversations": conversation((f"<image>\n{QUESTION}", llava_cot_answer()))},
        {"id": "chart-7", "image": chart, "conversations": conversation(
            ("What is the highest value?", llava_cot_answer(conclusion="42")),
            ("And the lowest?", llava_cot_answer().removesuffix("</CONCLUSION>")),  # bad_tags
        )},
        {"id": "gone", "image": "sqa/train/1/image.png",  # missing_image
         "conversations": conversation((QUESTION, llava_cot_answer()))},
        {"id": "text-only", "conversations": conversation((QUESTION, llava_cot_answer()))},
        {"id": "swapped", "image": chart, "conversations": [  # bad_conversations
            {"from": "gpt", "value": llava_cot_answer()}, {"from": "human", "value": QUESTION}]},
        "{not json",  # bad_json
        "",  # a blank line: no row
        {"id": "stray", "image": chart, "conversations": conversation(  # a tag inside a section
            (QUESTION, llava_cot_answer(caption="x <REASONING>y</REASONING>")))},
        {"id": "empty", "image": chart, "conversations": conversation(  # an empty section
            (QUESTION, llava_cot_answer(summary=" ")))},
        {"id": "chatty", "image": chart, "conversations": conversation(  # text outside the tags
            (QUESTION, "Sure! " + llava_cot_answer()))},
        {"id": 9, "image": "coco/train2017/000000000009.jpg",
         "conversations": conversation(("What is the colour?<image>", llava_cot_answer(
             summary="Look.", caption="A brown image.", reasoning="It is brown.",
             conclusion="Brown.")))},
    ]  # fmt: skip
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    result = convert_llava_cot([source], images_dir, tmp_path / "out", shard_size=2)
    assert result == {
        "train": 3,
        "val": 0,
        "rows": 10,
        "turns": 11,
        "skipped": {
            "bad_conversations": 1,
            "bad_json": 1,
            "bad_tags": 4,
            "missing_image": 1,
            "no_image": 1,
        },
    }
    samples = read_back(tmp_path / "out")["train"]
    records = {
        (r["row"], r["turn"]): (r, f) for f in samples.values() if (r := json.loads(f["json"]))
    }
    assert sorted(records) == [(0, 0), (1, 0), (9, 0)]  # rows count from 0 over non-blank lines
    record, fields = records[(0, 0)]
    assert record == {
        "question": QUESTION,
        "reasoning": f"{SUMMARY}\n\n{CAPTION}\n\n{REASONING}",
        "answer": "A",
        "reasoning_parts": {"summary": SUMMARY, "caption": CAPTION, "reasoning": REASONING},
        "source": LLAVA_COT_REPO,
        "num_images": 1,
        "format": "llava_cot",
        "row": 0,
        "turn": 0,
        "image_path": "sqa/train/20839/image.png",
        "id": "sqa-1",
    }
    assert fields["png"] == IMAGES["sqa/train/20839/image.png"]
    record, fields = records[(1, 0)]
    assert (record["question"], record["answer"], record["id"]) == (
        "What is the highest value?", "42", "chart-7"
    )  # fmt: skip
    assert fields["png"] == IMAGES[chart]
    record, fields = records[(9, 0)]
    assert (record["question"], record["reasoning"], record["answer"], record["id"]) == (
        "What is the colour?", "Look.\n\nA brown image.\n\nIt is brown.", "Brown.", 9
    )  # fmt: skip
    assert fields["jpg"] == IMAGES["coco/train2017/000000000009.jpg"]
    assert sorted(samples) == [f"llava_cot-train-{i:09d}" for i in (0, 1, 10)]  # turns counted


R1_FEATURES = Features(
    {
        "images": List(Value("string")),
        "problem": Value("string"),
        "answer": Value("string"),
        "caption": Value("string"),
    }
)  # di-zhang-fdu/llava-cot-100k-r1-format's card


def test_r1_format_in_both_layouts(tmp_path, images_dir):
    sqa, coco = "sqa/train/20839/image.png", "coco/train2017/000000000009.jpg"
    think = "Montana borders Canada.\nTexas borders Mexico."
    jsonl = tmp_path / "r1.jsonl"
    jsonl.write_text(
        json.dumps({"id": "r1-0", "image": sqa, "conversations": conversation(
            (QUESTION, f"<think>\n{think}\n</think>\n<answer> A </answer>"))}) + "\n"
        + json.dumps({"id": "r1-1", "image": sqa, "conversations": conversation(
            (QUESTION, llava_cot_answer()))}) + "\n"  # LLaVA-CoT tags: not R1's
    )  # fmt: skip
    rows = [
        {"images": [coco], "problem": "<image>What colour?", "caption": "A brown square.",
         "answer": "<think>It is brown.</think><answer>Brown.</answer>"},
        {"images": [coco], "problem": "What colour?", "caption": "c", "answer": "Brown."},
        {"images": [coco, sqa], "problem": "Which?", "caption": "c",
         "answer": "<think>t</think><answer>a</answer>"},
    ]  # fmt: skip
    write_parquet(rows, R1_FEATURES, tmp_path / "r1" / "train-00000.parquet")
    out = tmp_path / "out"
    result = convert_llava_cot([jsonl, tmp_path / "r1"], images_dir, out, tags="r1")
    assert result == {
        "train": 2, "val": 0, "rows": 5, "turns": 5,
        "skipped": {"bad_tags": 2, "image_count": 1},
    }  # fmt: skip
    samples = read_back(out)["train"]
    by_row = {r["row"]: r for r in (json.loads(f["json"]) for f in samples.values())}
    assert by_row[0] == {
        "question": QUESTION,
        "reasoning": think,
        "answer": "A",
        "source": LLAVA_COT_REPO,
        "num_images": 1,
        "format": "r1",
        "row": 0,
        "turn": 0,
        "image_path": sqa,
        "id": "r1-0",
    }
    assert by_row[2] == {
        "question": "What colour?",
        "reasoning": "It is brown.",
        "answer": "Brown.",
        "source": LLAVA_COT_R1_REPO,
        "num_images": 1,
        "format": "r1",
        "row": 2,
        "turn": 0,
        "image_path": coco,
        "caption": "A brown square.",
    }
    assert sorted(samples) == ["llava_cot_r1-train-000000000", "llava_cot_r1-train-000000002"]


def test_tag_parsers():
    assert parse_llava_cot(llava_cot_answer()) == {
        "summary": SUMMARY, "caption": CAPTION, "reasoning": REASONING, "conclusion": "A"
    }  # fmt: skip
    assert parse_r1("<think>a\nb</think>\n\n<answer>c</answer>\n") == {
        "think": "a\nb",
        "answer": "c",
    }
    bad = [
        None,
        "",
        "<think>a</think>",  # no answer
        "<answer>c</answer><think>a</think>",  # out of order
        "<think>a</think><answer>c</answer><answer>d</answer>",  # a section twice
        "<think>a</think> so <answer>c</answer>",  # text between sections
        "<THINK>a</THINK><ANSWER>c</ANSWER>",  # tags are case-sensitive
        "<think>a <answer>b</answer></think><answer>c</answer>",
    ]
    for text in bad:
        with pytest.raises(BadSample, match="bad_tags"):
            parse_r1(text)
    with pytest.raises(BadSample, match="bad_tags"):
        parse_llava_cot(llava_cot_answer().replace("<CAPTION>", "<CAPTION>\n<SUMMARY>x</SUMMARY>"))


# ------------------------------------------------------------------ one schema
def test_converted_and_synthetic_records_have_the_same_fields(rlaif_v_dir, tmp_path, images_dir):
    _, synthetic = make_sample(seed=0, split="train", index=0)
    assert tuple(preference_fields(synthetic)) == PREFERENCE_FIELDS
    assert tuple(cot_fields(synthetic)) == COT_FIELDS
    assert preference_fields(synthetic) == synthetic["preference"]
    assert cot_fields(synthetic) == synthetic["cot"]

    convert_rlaif_v([rlaif_v_dir], tmp_path / "p")
    for fields in read_back(tmp_path / "p")["train"].values():
        record = json.loads(fields["json"])
        assert preference_fields(record) == {k: record[k] for k in PREFERENCE_FIELDS}
    jsonl = tmp_path / "c.jsonl"
    row = {"image": "sqa/train/20839/image.png", "conversations": conversation((QUESTION, ANSWER))}
    jsonl.write_text(json.dumps(row))
    convert_llava_cot([jsonl], images_dir, tmp_path / "c")
    (fields,) = read_back(tmp_path / "c")["train"].values()
    record = json.loads(fields["json"])
    assert cot_fields(record) == {
        "question": QUESTION,
        "reasoning": record["reasoning"],
        "answer": "A",
    }

    with pytest.raises(BadSample, match="missing_chosen"):
        preference_fields({"prompt": "p", "rejected": "r"})
    with pytest.raises(BadSample, match="missing_reasoning"):
        cot_fields({"cot": {"question": "q", "answer": "a"}})


# ------------------------------------------------------------------ CLI
def test_cli_subcommands(rlaif_v_dir, tmp_path, images_dir, capsys):
    argv = ["shards", "rlaif-v", "--source", str(rlaif_v_dir), "--out", str(tmp_path / "p")]
    assert cli([*argv, "--val-fraction", "0", "--shard-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "5 train, 0 val samples from 9 rows at" in printed
    assert ("skipped 4 (bad_image 1, empty_response 1, image_token_in_text 1, "
            "same_responses 1)") in printed  # fmt: skip
    assert read_sizes(tmp_path / "p") == {
        "train-000000.tar": 2,
        "train-000001.tar": 2,
        "train-000002.tar": 1,
    }

    jsonl = tmp_path / "r1.jsonl"
    answer = "<think>t</think><answer>A</answer>"
    row = {"image": "sqa/train/20839/image.png", "conversations": conversation((QUESTION, answer))}
    jsonl.write_text(json.dumps(row) + "\n")
    argv = ["shards", "llava-cot", "--source", str(jsonl), "--images", str(images_dir)]
    assert cli([*argv, "--out", str(tmp_path / "c"), "--tags", "r1"]) == 0
    assert "1 train, 0 val samples from 1 rows, 1 turns at" in capsys.readouterr().out
    # the LLaVA-CoT tags expected: nothing parses, nothing written, exit 1
    assert cli([*argv, "--out", str(tmp_path / "c2")]) == 1
    assert "0 train, 0 val samples" in capsys.readouterr().out

    assert cli(["shards", "rlaif-v", "--source", str(tmp_path / "nowhere"), "--out", "x"]) == 2
    assert "neither a file nor a directory" in capsys.readouterr().err
    assert cli([*argv[:4], "--images", str(tmp_path / "no-images"), "--out", "x"]) == 2
    assert "no image directory" in capsys.readouterr().err


def test_synthetic_reasoned_pairs_in_rlaif_v_layout(tmp_path, capsys):
    """`vlscale shards synthetic-preference` then `rlaif-v`, the demo's stage-4 data: stage 2's
    colour questions, both responses in stage 3's think format, the rejected one's answer of a
    wrong colour (a different one from row to row): in even rows the shape it describes too (a
    hallucination), in odd rows the answer alone (a conclusion its reasoning does not give)."""
    from core.data.cot import parse_output
    from core.data.synthetic import COLOURS, questions

    src, out = tmp_path / "src", tmp_path / "pref"
    assert cli(["shards", "synthetic-preference", "--out", str(src), "--rows", "6"]) == 0
    assert cli(["shards", "rlaif-v", "--source", str(src), "--out", str(out)]) == 0
    assert "6 train, 0 val samples from 6 rows" in capsys.readouterr().out
    with tarfile.open(out / "train-000000.tar") as tar:
        records = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert len(records) == 6
    asked_about, wrong_colours = [], set()
    for record in records:
        index = int(record["idx"])
        _, scene = make_sample(0, "preference", index)
        shape = scene["shapes"][index % len(scene["shapes"])]  # every shape in turn
        asked_about.append(shape == scene["shapes"][0])
        truth = shape["colour"]
        asked = {qa["question"]: qa["answer"] for qa in questions(scene)}
        assert asked[record["prompt"]] == truth  # a stage-2 question, answered by the scene
        chosen, rejected = (parse_output("think", record[s]) for s in ("chosen", "rejected"))
        names = list(COLOURS)
        shift = 1 + (index // 2) % (len(names) - 1)
        assert chosen == truth and rejected == names[(names.index(truth) + shift) % len(names)]
        if index % 2 == 0:  # hallucination: every mention of the colour changed
            assert record["rejected"] == record["chosen"].replace(truth, rejected)
        else:  # conclusion: the reasoning kept, only what follows </think> changed
            reasoning, answer = record["chosen"].rsplit("</think>", 1)
            assert record["rejected"] == reasoning + "</think>" + answer.replace(truth, rejected)
            assert truth in reasoning and rejected not in reasoning
        wrong_colours.add(rejected)
    assert not all(asked_about)  # not always the first shape
    assert len(wrong_colours) > 2  # not always the next colour
