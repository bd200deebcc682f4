"""Synthetic shapes: determinism, captions/QA, tar layout, tokenizer, the shards CLI, CC3M copy."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from core.data import synthetic
from core.data.shards import read_sizes, write_tar
from core.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    caption,
    chain_of_thought,
    make_sample,
    preference_pair,
    questions,
    write_llava_cot_jsonl,
    write_synthetic_shards,
)
from launch import shards as shards_cli

REPO = Path(__file__).resolve().parents[1]

TWO_SHAPES = {
    "shapes": [
        {"colour": "red", "shape": "circle", "size": "large", "position": "top left",
         "jitter": [0, 0]},
        {"colour": "blue", "shape": "square", "size": "small", "position": "bottom right",
         "jitter": [1, -1]},
    ],
    "background": "gray",
    "count": 2,
}  # fmt: skip


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    shards_cli.add_arguments(parser)
    return shards_cli.main(parser.parse_args(list(argv)))


# ------------------------------------------------------------------------- generator
def test_same_seed_same_bytes_other_seed_differs():
    for index in range(5):
        assert make_sample(3, "train", index) == make_sample(3, "train", index)
    assert make_sample(3, "train", 0) != make_sample(4, "train", 0)
    assert make_sample(3, "train", 0) != make_sample(3, "val", 0)


def test_shard_files_are_deterministic(tmp_path):
    kwargs = {"n_train": 20, "n_val": 5, "shard_size": 8, "image_size": 32}
    write_synthetic_shards(tmp_path / "a", seed=1, **kwargs)
    write_synthetic_shards(tmp_path / "b", seed=1, **kwargs)
    write_synthetic_shards(tmp_path / "c", seed=2, **kwargs)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    for name in names + ["sizes.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / names[0]).read_bytes() != (tmp_path / "c" / names[0]).read_bytes()


def test_image_shows_what_the_attributes_say():
    size = 64
    for index in range(40):
        jpeg, record = make_sample(0, "val", index, image_size=size)
        pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int32)
        cell = size / 3
        occupied = set()
        for shape in record["shapes"]:
            row, col = divmod(POSITIONS.index(shape["position"]), 3)
            occupied.add((row, col))
            x = int((col + 0.5 + shape["jitter"][0] / 20) * cell)
            y = int((row + 0.5 + shape["jitter"][1] / 20) * cell)
            assert np.abs(pixels[y, x] - COLOURS[shape["colour"]]).max() < 40, (index, shape)
        empty = next((r, c) for r in range(3) for c in range(3) if (r, c) not in occupied)
        centre = pixels[int((empty[0] + 0.5) * cell), int((empty[1] + 0.5) * cell)]
        assert np.abs(centre - BACKGROUNDS[record["background"]]).max() < 40, index


def test_caption_lists_every_shape_in_reading_order():
    assert caption(TWO_SHAPES) == (
        "a large red circle at the top left and a small blue square at the bottom right"
        " on a gray background"
    )
    for index in range(200):
        _, record = make_sample(0, "train", index)
        shapes = record["shapes"]
        assert record["count"] == len(shapes) in (1, 2, 3)
        cells = [POSITIONS.index(s["position"]) for s in shapes]
        assert cells == sorted(set(cells))  # one shape per cell, in reading order
        text = record["caption"]
        assert text.endswith(f" on a {record['background']} background")
        assert text.count(" at the ") == len(shapes)
        for shape in shapes:
            assert f"a {shape['size']} {shape['colour']} {shape['shape']} at the " in text


def test_validation_captions_are_almost_all_distinct():
    captions = [make_sample(0, "val", i)[1]["caption"] for i in range(512)]
    assert len(set(captions)) >= 0.98 * len(captions)


def test_questions_are_answered_by_the_attributes():
    qa = {pair["question"]: pair["answer"] for pair in questions(TWO_SHAPES)}
    assert qa == {
        "How many shapes are there?": "two",
        "What colour is the background?": "gray",
        "What colour is the shape at the top left?": "red",
        "What shape is at the top left?": "circle",
        "How big is the shape at the top left?": "large",
        "Where is the large red circle?": "top left",
        "What colour is the shape at the bottom right?": "blue",
        "What shape is at the bottom right?": "square",
        "How big is the shape at the bottom right?": "small",
        "Where is the small blue square?": "bottom right",
        "Is there a shape at the top?": "no",
        "Is there a shape at the top left?": "yes",
    }


def test_where_questions_skip_ambiguous_shapes():
    twins = json.loads(json.dumps(TWO_SHAPES))
    twins["shapes"][1].update(colour="red", shape="circle", size="large")
    asked = [pair["question"] for pair in questions(twins)]
    assert not [q for q in asked if q.startswith("Where is")]


def test_chain_of_thought_counts_the_first_colour():
    cot = chain_of_thought(TWO_SHAPES)
    assert cot["question"] == "How many red shapes are there?"
    assert cot["answer"] == "one"
    assert "large red circle" in cot["reasoning"] and "small blue square" in cot["reasoning"]
    twins = json.loads(json.dumps(TWO_SHAPES))
    twins["shapes"][1]["colour"] = "red"
    assert chain_of_thought(twins)["answer"] == "two"


def test_chain_of_thought_colour_and_shape_questions_name_the_first_shape():
    for kind, answer in (("colour", "red"), ("shape", "circle")):
        cot = chain_of_thought(TWO_SHAPES, kind)
        assert cot["answer"] == answer
        # the question is stage 2's VQA question, word for word
        assert {"question": cot["question"], "answer": answer} in questions(TWO_SHAPES)
        assert cot["caption"] == f"The shape at the top left is {answer}: a large red circle."
        assert cot["reasoning"] == f"The question asks for its {kind}, so the answer is {answer}."
    second = chain_of_thought(TWO_SHAPES, "colour", which=1)  # every shape can be asked about
    assert second["question"] == "What colour is the shape at the bottom right?"
    assert second["answer"] == "blue"
    assert chain_of_thought(TWO_SHAPES, "shape", which=3)["answer"] == "square"  # modulo 2
    with pytest.raises(ValueError, match="valid: count, colour, shape"):
        chain_of_thought(TWO_SHAPES, "size")


def test_llava_cot_rows_rotate_the_question_kinds(tmp_path):
    path = write_llava_cot_jsonl(tmp_path, rows=6, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    asked = [row["conversations"][0]["value"].removeprefix("<image>\n") for row in rows]
    assert [q.split()[:2] for q in asked[:3]] == [["How", "many"], ["What", "colour"],
                                                 ["What", "shape"]]  # fmt: skip
    for row, question in zip(rows, asked):
        answer = row["conversations"][1]["value"]
        conclusion = answer.rsplit("<CONCLUSION> ", 1)[1].removesuffix(" </CONCLUSION>")
        assert f"so the answer is {conclusion}." in answer or question.startswith("How many")


def test_preference_rejects_a_wrong_colour():
    pair = preference_pair(TWO_SHAPES)
    assert pair["chosen"] == caption(TWO_SHAPES)
    assert pair["rejected"] == pair["chosen"].replace("large red circle", "large orange circle")
    assert TWO_SHAPES["shapes"][0]["colour"] == "red"  # the input is not modified


# ------------------------------------------------------------------------- shards
def test_tar_layout_and_sizes(shapes_dir, shapes_spec):
    sizes = read_sizes(shapes_dir)
    assert sizes == {
        "train-000000.tar": 32, "train-000001.tar": 32, "train-000002.tar": 32,
        "val-000000.tar": 32,
    }  # fmt: skip
    assert not list(shapes_dir.glob("*.tmp"))
    with tarfile.open(shapes_dir / "train-000001.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000000032.jpg", "000000032.txt", "000000032.json"]
        assert len(names) == 3 * 32
        record = json.loads(tar.extractfile("000000032.json").read())
        text = tar.extractfile("000000032.txt").read().decode()
        image = Image.open(io.BytesIO(tar.extractfile("000000032.jpg").read()))
    assert image.format == "JPEG" and image.size == (shapes_spec["image_size"],) * 2
    assert record["caption"] == text == caption(record)
    assert {"shapes", "background", "count", "qa", "cot", "preference"} <= record.keys()
    assert record == make_sample(0, "train", 32, shapes_spec["image_size"])[1]


def test_write_tar_leaves_nothing_when_interrupted(tmp_path):
    def samples():
        yield "000000000", {"txt": b"fine"}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_tar(tmp_path / "x.tar", samples())
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_loads_with_auto_tokenizer_and_round_trips(shapes_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(shapes_dir / "tokenizer"))
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    special = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert len(special) == 3 and None not in special
    text = caption(TWO_SHAPES)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.split()) * 2  # merges learned whole caption words
    assert tokenizer.decode(tokenizer("Zebra ünïcode!")["input_ids"]) == "Zebra ünïcode!"


def test_synthetic_cli(tmp_path):
    out = tmp_path / "shapes"
    args = ["synthetic", "--out", str(out), "--train", "10", "--val", "3", "--seed", "5"]
    assert run_cli(*args, "--shard-size", "4", "--image-size", "16") == 0
    assert read_sizes(out) == {
        "train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 2, "val-000000.tar": 3
    }  # fmt: skip
    with tarfile.open(out / "val-000000.tar") as tar:
        image = Image.open(io.BytesIO(tar.extractfile("000000000.jpg").read()))
    assert image.size == (16, 16)
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_shapes_drawn_wrapper_draws_the_shards_at_other_sizes(tmp_path, monkeypatch):
    """benchmarks/shapes_drawn.py (BENCHMARKS.md's bigger-shapes runs): the wrapped command
    writes the shards that the generator writes with those radii and that jitter, byte for byte
    (and not the default ones); radii that would cross into the next cell are refused."""
    script = [sys.executable, str(REPO / "benchmarks" / "shapes_drawn.py")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = ["shards", "synthetic", "--train", "24", "--val", "1"]
    wrapper = script + ["--radii", "0.3,0.36,0.42", "--jitter", "1", "--"]
    subprocess.run(wrapper + command + ["--out", str(tmp_path / "big")], check=True, env=env)
    write_synthetic_shards(tmp_path / "default", 24, 1, seed=0)
    for name, radius in zip(synthetic.SIZES, (0.3, 0.36, 0.42), strict=True):
        monkeypatch.setitem(synthetic.SIZES, name, radius)
    monkeypatch.setattr(synthetic, "JITTER", 1)
    write_synthetic_shards(tmp_path / "expected", 24, 1, seed=0)
    shard = "train-000000.tar"
    drawn = (tmp_path / "big" / shard).read_bytes()
    assert drawn == (tmp_path / "expected" / shard).read_bytes()
    assert drawn != (tmp_path / "default" / shard).read_bytes()
    refused = subprocess.run(
        script + ["--radii", "0.3,0.4,0.45", "--jitter", "2", "--"] + command
        + ["--out", str(tmp_path / "refused")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode != 0 and "cross into the next cell" in refused.stderr


# ------------------------------------------------------------------------- CC3M
def fake_pixparse(directory: Path) -> dict[str, int]:
    """cc3m-{split}-NNNN.tar as pixparse/cc3m-wds names them, plus files that must be ignored."""
    directory.mkdir()
    sizes = {"cc3m-train-0000.tar": 3, "cc3m-train-0001.tar": 2, "cc3m-validation-0000.tar": 4}
    start = 0
    for name, count in sizes.items():
        samples = []
        for index in range(start, start + count):
            jpeg, record = make_sample(0, "cc3m", index, image_size=16)
            samples.append((f"{index:09d}", {"jpg": jpeg, "txt": record["caption"].encode()}))
        write_tar(directory / name, samples)
        start += count
    (directory / "_info.json").write_text("{}")
    (directory / "other-train-0000.tar").write_bytes(
        (directory / "cc3m-train-0000.tar").read_bytes()
    )
    return sizes


def test_cc3m_copies_and_verifies_a_local_pixparse_directory(tmp_path):
    sizes = fake_pixparse(tmp_path / "pixparse")
    out = tmp_path / "cc3m"
    assert run_cli("cc3m", "--out", str(out), "--source", str(tmp_path / "pixparse")) == 0
    assert read_sizes(out) == sizes
    assert sorted(p.name for p in out.iterdir()) == sorted([*sizes, "sizes.json"])
    for name in sizes:
        assert (out / name).read_bytes() == (tmp_path / "pixparse" / name).read_bytes()


def test_cc3m_split_selection_and_broken_shards(tmp_path, caplog):
    source = tmp_path / "pixparse"
    fake_pixparse(source)
    whole = (source / "cc3m-train-0001.tar").read_bytes()
    (source / "cc3m-train-0002.tar").write_bytes(whole[: len(whole) // 2])
    (source / "cc3m-train-0003.tar").write_bytes(b"not a tar file at all" * 40)
    out = tmp_path / "cc3m"
    assert (
        run_cli("cc3m", "--out", str(out), "--source", str(source), "--splits", "validation") == 0
    )
    assert read_sizes(out) == {"cc3m-validation-0000.tar": 4}
    assert run_cli("cc3m", "--out", str(out), "--source", str(source), "--splits", "train") == 1
    assert read_sizes(out) == {
        "cc3m-train-0000.tar": 3, "cc3m-train-0001.tar": 2, "cc3m-validation-0000.tar": 4
    }  # fmt: skip
    assert "cc3m-train-0002.tar is truncated" in caplog.text
    assert "cc3m-train-0003.tar is unreadable" in caplog.text


def test_cc3m_source_without_shards_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cc3m-train"):
        run_cli("cc3m", "--out", str(tmp_path / "o"), "--source", str(tmp_path / "empty"))


def test_shape_colours_never_match_the_background():
    assert set(COLOURS).isdisjoint(BACKGROUNDS)
    assert set(COLOURS.values()).isdisjoint(BACKGROUNDS.values())
