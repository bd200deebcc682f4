"""FineVision data path: synthetic FineVision-format parquet, the chat tokenizer, conversion to
webdataset shards, the Qwen2.5 ChatML processor and the VLM sample decoders, the CLI."""

from __future__ import annotations

import functools
import io
import json
import re

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from core.data import finevision
from core.data.chat import IGNORE, ChatProcessor, VLMEvalDecoder, VLMTrainDecoder
from core.data.errors import BadSample
from core.data.finevision import (
    RATINGS,
    check_ratings,
    convert_finevision,
    convert_row,
    image_extension,
    val_draw,
)
from core.data.packing import PackedCollate
from core.data.preprocess import SIGLIP_MEAN, SIGLIP_STD, ImageTextDecoder
from core.data.shards import open_shard, read_sizes
from core.data.stream import ShardStream
from core.data.synthetic import (
    COLOURS,
    NUMBERS,
    POSITIONS,
    SHAPES,
    VQA_SUBSETS,
    caption,
    describe,
    finevision_features,
    questions,
    vqa_conversation,
    vqa_row,
    write_finevision_parquet,
)
from core.data.tokenizer import QWEN_SPECIAL_TOKENS, train_bpe_tokenizer
from launch.cli import main as cli

N_TRAIN, N_VAL, SIZE, IMAGE_TOKENS = 12, 4, 32, 3
FINEVISION_COLUMNS = [
    "images", "texts", "source",
    "relevance_ratings", "relevance_min",
    "image_correspondence_ratings", "image_correspondence_min",
    "formatting_ratings", "formatting_min",
    "visual_dependency_ratings", "visual_dependency_min",
]  # fmt: skip


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("parquet")
    write_finevision_parquet(out, N_TRAIN, N_VAL, seed=0, image_size=SIZE)
    return out


@pytest.fixture(scope="module")
def tokenizer(parquet_dir):
    return AutoTokenizer.from_pretrained(parquet_dir / "tokenizer")


@pytest.fixture(scope="module")
def shards_dir(parquet_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    convert_finevision(parquet_dir, VQA_SUBSETS, out, val_samples=3, shard_size=5)
    return out


def load_rows(files, tmp_path, streaming=False):
    return datasets.load_dataset(
        "parquet",
        data_files={"train": [str(f) for f in files]},
        split="train",
        streaming=streaming,
        cache_dir=str(tmp_path / "cache"),
    )


def shard_samples(directory, split: str) -> list[dict]:
    samples = []
    for name in sorted(read_sizes(directory)):
        if name.startswith(split):
            shard = open_shard(str(directory / name))
            samples += [shard.read(i) for i in range(len(shard))]
            shard.close()
    return samples


def jpeg(size=(40, 30), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def raw_sample(texts, images=(), num_images=None, key="k-train-000000000", source="src"):
    record = {"texts": texts, "source": source, "num_images": len(images)}
    if num_images is not None:
        record["num_images"] = num_images
    sample = {"__key__": key, "json": json.dumps(record).encode()}
    sample.update({f"{i}.jpg": data for i, data in enumerate(images)})
    return sample


def qa(*pairs):
    return [{"user": u, "assistant": a} for u, a in pairs]


# ------------------------------------------------------------------ synthetic parquet
def test_parquet_reads_back_through_datasets_like_finevision(parquet_dir, tmp_path):
    schema = pq.read_schema(parquet_dir / "shapes_colour" / "train-00000.parquet")
    assert schema.names == FINEVISION_COLUMNS
    assert str(schema.field("images").type) == (
        "list<element: struct<bytes: binary, path: string>>"
    )
    for subset in VQA_SUBSETS:
        assert (parquet_dir / subset / "val-00000.parquet").is_file()
        rows = load_rows([parquet_dir / subset / "train-00000.parquet"], tmp_path)
        assert len(rows) == N_TRAIN
        assert rows.features == finevision_features()
        assert isinstance(rows.features["images"], datasets.List)
        assert isinstance(rows.features["images"].feature, datasets.Image)
        row = rows[0]
        expected = vqa_row(subset, 0, "train", 0, SIZE)
        assert row["texts"] == expected["texts"] and row["source"] == subset
        assert len(row["images"]) == {"shapes_text": 0, "shapes_two_images": 2}.get(subset, 1)
        for image in row["images"]:  # decoded by datasets, like the hub dataset's rows
            assert isinstance(image, Image.Image) and image.size == (SIZE, SIZE)
        assert row["relevance_ratings"] == [5] * len(row["texts"]) and row["relevance_min"] == 5
    stream = load_rows([parquet_dir / "shapes_two_images" / "train-00000.parquet"], tmp_path, True)
    first = next(iter(stream.decode(False)))
    assert first["images"][0]["bytes"].startswith(b"\x89PNG")  # original bytes kept


def test_rows_are_seeded_and_train_val_disjoint():
    for subset in VQA_SUBSETS:
        assert vqa_row(subset, 3, "train", 1, SIZE) == vqa_row(subset, 3, "train", 1, SIZE)
    rows = {
        subset: [vqa_conversation(subset, 0, "train", i) for i in range(20)]
        for subset in VQA_SUBSETS
    }
    other_seed = [vqa_conversation("shapes_caption", 1, "train", i) for i in range(20)]
    val = [vqa_conversation("shapes_caption", 0, "val", i) for i in range(20)]
    assert other_seed != rows["shapes_caption"] and val != rows["shapes_caption"]
    with pytest.raises(ValueError, match="shapes_colour"):
        vqa_conversation("shapes_colours", 0, "train", 0)


@pytest.mark.parametrize("index", range(30))
def test_answers_follow_from_the_scene(index):
    def shape_at(scene, position):
        return next(s for s in scene["shapes"] if s["position"] == position)

    for subset in VQA_SUBSETS:
        scenes, texts = vqa_conversation(subset, 0, "train", index)
        for turn in texts:
            assert turn["user"] and turn["assistant"]
        question, answer = texts[0]["user"], texts[0]["assistant"]
        if subset in ("shapes_colour", "shapes_shape", "shapes_count", "shapes_position"):
            assert len(texts) == 1 and len(scenes) == 1
            assert {"question": question, "answer": answer} in questions(scenes[0])
        if subset == "shapes_colour":
            where = re.fullmatch(r"What colour is the shape at the (.+)\?", question)[1]
            assert answer == shape_at(scenes[0], where)["colour"] and answer in COLOURS
        elif subset == "shapes_shape":
            where = re.fullmatch(r"What shape is at the (.+)\?", question)[1]
            assert answer == shape_at(scenes[0], where)["shape"] and answer in SHAPES
        elif subset == "shapes_count":
            assert question == "How many shapes are there?"
            assert answer == NUMBERS[len(scenes[0]["shapes"])]
        elif subset == "shapes_position":
            what = re.fullmatch(r"Where is the (.+)\?", question)[1]
            matching = [s for s in scenes[0]["shapes"] if describe(s) == what]
            assert len(matching) == 1 and answer == matching[0]["position"] in POSITIONS
        elif subset == "shapes_caption":
            assert (question, answer) == ("Describe the image.", caption(scenes[0]))
        elif subset == "shapes_multiturn":
            assert 2 <= len(texts) <= 4 and len(scenes) == 1
            pairs = [{"question": t["user"], "answer": t["assistant"]} for t in texts]
            assert all(p in questions(scenes[0]) for p in pairs)
            assert len({p["question"] for p in pairs}) == len(pairs)
        elif subset == "shapes_text":
            assert scenes == [] and len(texts) == 1
        elif subset == "shapes_two_images":
            first, second = (len(s["shapes"]) for s in scenes)
            assert first != second
            more = question == "Which image has more shapes?"
            assert more or question == "Which image has fewer shapes?"
            assert answer == ("the first" if (first > second) == more else "the second")


def test_text_only_rows_carry_the_caption():
    _, texts = vqa_conversation("shapes_text", 0, "train", 5)
    match = re.fullmatch(r"The picture shows (.+)\. (.+\?)", texts[0]["user"])
    assert match and " background" in match[1]


# ------------------------------------------------------------------ tokenizer
def test_vlm_tokenizer_has_qwen_specials_and_a_chat_template(tokenizer):
    for token in QWEN_SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token is None
    text = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
            {"role": "assistant", "content": "red"},
        ],
        tokenize=False,
    )
    assert text == (
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )
    ids = tokenizer("<|im_start|>user\nred<|image_pad|>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nred"


def test_plain_tokenizer_unchanged_and_missing_specials_are_named(tmp_path):
    plain = train_bpe_tokenizer(["a red circle"] * 5, tmp_path / "plain", vocab_size=300)
    assert (plain.pad_token_id, plain.bos_token_id, plain.eos_token_id) == (0, 1, 2)
    with pytest.raises(ValueError, match=re.escape("'<|im_start|>'")):
        ChatProcessor(plain, IMAGE_TOKENS)
    partial = train_bpe_tokenizer(
        ["a red circle"] * 5, tmp_path / "partial", 300, ["<|im_start|>", "<|im_end|>"]
    )
    with pytest.raises(ValueError, match=re.escape("'<|vision_start|>'")):
        ChatProcessor(partial, IMAGE_TOKENS)


# ------------------------------------------------------------------ chat processor
def template_ids(tokenizer, texts, num_images, system, image_tokens, prompt=False):
    """Ids of the tokenizer's own chat template, rendered and tokenised, image pads expanded."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for i, turn in enumerate(texts):
        parts = [{"type": "image"}] * (num_images if i == 0 else 0)
        parts.append({"type": "text", "text": turn["user"]})
        messages.append({"role": "user", "content": parts})
        if not (prompt and i == len(texts) - 1):
            messages.append({"role": "assistant", "content": turn["assistant"]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


CONVERSATIONS = {
    "single": (qa(("What colour is the shape at the top left?", "red")), 1),
    "multiturn": (qa(("How many shapes are there?", "two"), ("Where is the red circle?",
                     "top left"), ("What colour is the background?", "gray")), 1),
    "two_images": (qa(("Which image has more shapes?", "the second")), 2),
    "text_only": (qa(("The picture shows a red circle. What shape is it?", "circle")), 0),
    "caption": (qa(("Describe the image.", "a large red circle at the top on a gray "
                    "background")), 1),
}  # fmt: skip


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("system", ["You are a helpful assistant.", "Answer briefly."])
def test_ids_equal_the_chat_template(tokenizer, name, system):
    texts, n = CONVERSATIONS[name]
    processor = ChatProcessor(tokenizer, IMAGE_TOKENS, system_prompt=system)
    ids, labels = processor.encode(texts, n)
    assert ids == template_ids(tokenizer, texts, n, system, IMAGE_TOKENS)
    assert len(labels) == len(ids)
    prompt = processor.prompt(texts, n)
    assert prompt == template_ids(tokenizer, texts, n, system, IMAGE_TOKENS, prompt=True)
    assert ids[: len(prompt)] == prompt
    assert tokenizer.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_no_system_prompt_leaves_the_system_turn_out(tokenizer):
    """system_prompt=None passes no system message: this tokenizer's template then writes no
    system turn (unlike Qwen2-VL's, which writes a default one), nor does ChatML (a tokenizer
    without a template)."""
    texts, n = CONVERSATIONS["multiturn"]
    with_system = ChatProcessor(tokenizer, IMAGE_TOKENS).encode(texts, n)
    without = ChatProcessor(tokenizer, IMAGE_TOKENS, system_prompt=None).encode(texts, n)
    source, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        chatml = ChatProcessor(tokenizer, IMAGE_TOKENS, system_prompt=None).encode(texts, n)
    finally:
        tokenizer.chat_template = source
    assert chatml == without
    system_ids = tokenizer(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", add_special_tokens=False
    )["input_ids"]
    assert with_system[0] == system_ids + without[0]
    assert with_system[1] == [IGNORE] * len(system_ids) + without[1]
    assert tokenizer.decode(without[0]).startswith("<|im_start|>user\n")


def test_labels_supervise_exactly_the_answers_and_their_im_end(tokenizer):
    processor = ChatProcessor(tokenizer, IMAGE_TOKENS)
    texts = qa(("What colour is the shape at the top?", "red"))
    ids, labels = processor.encode(texts, 1)
    prompt = template_ids(tokenizer, texts, 1, "You are a helpful assistant.", 3, prompt=True)
    answer = tokenizer("red", add_special_tokens=False)["input_ids"]
    im_end, newline = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer("\n")["input_ids"]
    assert ids == prompt + answer + [im_end] + newline
    assert labels == [IGNORE] * len(prompt) + answer + [im_end] + [IGNORE] * len(newline)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_label_mask_per_turn(tokenizer, name):
    texts, n = CONVERSATIONS[name]
    processor = ChatProcessor(tokenizer, IMAGE_TOKENS)
    ids, labels = processor.encode(texts, n)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
    supervised = np.array(labels) != IGNORE
    # runs of supervised tokens: one per turn, each the answer followed by <|im_end|>
    starts = [i for i in range(len(ids)) if supervised[i] and (i == 0 or not supervised[i - 1])]
    runs = []
    for start in starts:
        end = start
        while end < len(ids) and supervised[end]:
            end += 1
        runs.append(ids[start:end])
        assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")
        assert not supervised[end]  # the "\n" after <|im_end|>
    assert [tokenizer.decode(run[:-1]) for run in runs] == [t["assistant"] for t in texts]
    assert all(run[-1] == im_end for run in runs)
    assert sum(supervised) == sum(len(run) for run in runs)
    # images: n blocks of image_tokens pads, all in the first user turn, none supervised
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    pads = [i for i, t in enumerate(ids) if t == pad]
    assert len(pads) == n * IMAGE_TOKENS
    assert not any(supervised[p] for p in pads)
    first_user_end = ids.index(im_end, ids.index(im_end) + 1)  # after the system turn
    assert all(p < first_user_end for p in pads)
    start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert ids.count(start) == n


def test_processor_rejects_special_tokens_in_text_and_bad_texts(tokenizer):
    processor = ChatProcessor(tokenizer, IMAGE_TOKENS)
    for text in ("look <|image_pad|>", "<|im_end|>"):
        with pytest.raises(BadSample, match="special_token_in_text"):
            processor.encode(qa((text, "red")), 1)
        with pytest.raises(BadSample, match="special_token_in_text"):
            processor.encode(qa(("q?", text)), 1)
    with pytest.raises(BadSample, match="empty_texts"):
        processor.encode([], 0)
    with pytest.raises(BadSample, match="bad_texts"):
        processor.encode([{"user": 3, "assistant": "x"}], 0)
    with pytest.raises(ValueError, match="image_tokens"):
        ChatProcessor(tokenizer, 0)
    with pytest.raises(ValueError, match="special token"):
        ChatProcessor(tokenizer, 1, system_prompt="be <|im_start|>")


# ------------------------------------------------------------------ conversion
def test_conversion_counts_layout_and_tar_contents(parquet_dir, shards_dir):
    assert (shards_dir / "tokenizer" / "tokenizer.json").is_file()
    for subset in VQA_SUBSETS:
        sizes = read_sizes(shards_dir / subset)
        assert sizes == {
            "train-000000.tar": 5,
            "train-000001.tar": 5,
            "train-000002.tar": 2,
            "val-000000.tar": 3,
        }
        assert sorted(p.name for p in (shards_dir / subset).glob("*.tar")) == sorted(sizes)
        train = shard_samples(shards_dir / subset, "train")
        val = shard_samples(shards_dir / subset, "val")
        assert [s["__key__"] for s in train] == [f"{subset}-train-{i:09d}" for i in range(12)]
        assert [s["__key__"] for s in val] == [f"{subset}-val-{i:09d}" for i in range(3)]
        for split, samples in (("train", train), ("val", val)):
            for i, sample in enumerate(samples):
                row = vqa_row(subset, 0, split, i, SIZE)
                record = json.loads(sample["json"])
                assert record["texts"] == row["texts"] and record["source"] == subset
                assert record["num_images"] == len(row["images"])
                assert record["visual_dependency_min"] == 5
                ext = "png" if subset == "shapes_two_images" else "jpg"
                images = {
                    k: v for k, v in sample.items() if k not in ("json", "__key__", "__url__")
                }
                assert images == {f"{j}.{ext}": b for j, b in enumerate(row["images"])}


def write_rows(path, rows):
    """FineVision-format parquet of `rows` (image bytes, texts, source and the rating columns
    the first row has)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [name for name in finevision_features() if name in rows[0]]
    columns = {name: [row.get(name) for row in rows] for name in names}
    columns["images"] = [[{"bytes": b, "path": None} for b in row["images"]] for row in rows]
    features = datasets.Features({k: finevision_features()[k] for k in names})
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))


def good_row(i):
    return {"images": [jpeg(colour=(i, 0, 0))], "texts": qa((f"q{i}?", f"a{i}")), "source": "s"}


@pytest.fixture
def messy_dir(tmp_path):
    """A hub-like subset (train split only) with undecodable images and empty texts."""
    rows = [good_row(0), good_row(1)]
    rows.append({"images": [b"not an image"], "texts": qa(("q?", "a")), "source": "s"})
    rows.append({"images": [jpeg()[:100]], "texts": qa(("q?", "a")), "source": "s"})  # truncated
    rows.append({"images": [], "texts": [], "source": "s"})
    rows.append({"images": [jpeg()], "texts": qa(("q?", " "), ("q2?", "")), "source": "s"})
    rows += [good_row(i) for i in range(2, 7)]
    write_rows(tmp_path / "src" / "messy" / "train-00000.parquet", rows)
    return tmp_path / "src"


def draw(row) -> float:
    """The val draw of a row as written by write_rows (and read back by the converter)."""
    return val_draw({"images": [{"bytes": b} for b in row["images"]], "texts": row["texts"]})


MESSY_GOOD = {0: 0, 1: 1, 6: 2, 7: 3, 8: 4, 9: 5, 10: 6}  # source row -> good_row index


def test_bad_rows_are_skipped_counted_and_val_is_drawn_by_content(messy_dir, tmp_path):
    out = tmp_path / "out"
    result = convert_finevision(messy_dir, ["messy"], out, val_samples=3, shard_size=2)
    # no val files: a row is val when its content's draw is below 3 / 11 (rows in the subset)
    in_val = [row for row, i in MESSY_GOOD.items() if draw(good_row(i)) < 3 / 11]
    assert in_val == [0, 1, 8]  # these rows' draws: 0.14, 0.26, 0.23; the others' > 0.38
    assert result == {
        "messy": {"train": 4, "val": 3, "skipped": {"bad_image": 2, "empty_texts": 2}}
    }
    val = shard_samples(out / "messy", "val")
    train = shard_samples(out / "messy", "train")
    assert [s["__key__"] for s in val] == [f"messy-val-{row:09d}" for row in in_val]
    assert [s["__key__"] for s in train] == [f"messy-train-{row:09d}" for row in (6, 7, 9, 10)]
    answers = [json.loads(s["json"])["texts"][0]["assistant"] for s in val + train]
    assert answers == [f"a{i}" for i in (0, 1, 4, 2, 3, 5, 6)]
    assert val[0]["0.jpg"] == jpeg(colour=(0, 0, 0))  # original bytes
    assert not (out / "tokenizer").exists()  # the source has none
    # re-converting fewer rows removes the earlier conversion's extra shards
    again = convert_finevision(
        messy_dir, ["messy"], out, val_samples=1, shard_size=2, max_samples=4
    )  # rows 0-3 read, 2 and 3 unusable; fraction 1 / 4: row 0 (0.14) is val, row 1 (0.26) not
    assert again["messy"] == {"train": 1, "val": 1, "skipped": {"bad_image": 2}}
    assert sorted(p.name for p in (out / "messy").glob("*.tar")) == [
        "train-000000.tar",
        "val-000000.tar",
    ]
    assert read_sizes(out / "messy") == {"train-000000.tar": 1, "val-000000.tar": 1}


def test_hub_ids_are_streamed_with_datasets(messy_dir, tmp_path, monkeypatch):
    calls = []
    real = datasets.load_dataset

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        files = [str(messy_dir / "messy" / "train-00000.parquet")]
        dataset = real("parquet", data_files={"train": files}, split="train", streaming=True)
        if name == "messy":  # the hub card's dataset_info gives each config's num_examples
            dataset.info.splits = datasets.SplitDict()
            dataset.info.splits.add(datasets.SplitInfo(name="train", num_examples=11))
        return dataset

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = convert_finevision("HuggingFaceM4/FineVision", ["messy"], tmp_path / "o", 3, 10)
    assert calls == [("HuggingFaceM4/FineVision", "messy", {"split": "train", "streaming": True})]
    assert result["messy"]["val"] == 3 and result["messy"]["train"] == 4  # as from local files
    assert source_keys(tmp_path / "o" / "messy", "val") == [0, 1, 8]
    # a card without num_examples: --val-samples cannot become a fraction, --val-fraction can
    with pytest.raises(ValueError, match="give --val-fraction"):
        convert_finevision("HuggingFaceM4/FineVision", ["unsized"], tmp_path / "u", 3, 10)
    result = convert_finevision(
        "HuggingFaceM4/FineVision", ["unsized"], tmp_path / "u", 3, 10, val_fraction=3 / 11
    )
    assert (result["unsized"]["val"], result["unsized"]["train"]) == (3, 4)


def rated_row(i: int, **ratings) -> dict:
    """good_row(i) with FineVision's four rating columns: 5 on its turn unless `ratings` gives
    a column's list (None: unrated)."""
    row = good_row(i)
    for name in RATINGS:
        values = ratings.get(name, [5])
        row[f"{name}_ratings"] = values
        row[f"{name}_min"] = None if values is None else min(values)
    return row


def rated_rows(n: int) -> list[dict]:
    rows = [rated_row(i) for i in range(n)]
    rows[3] = rated_row(3, relevance=[5, 2])
    rows[5] = rated_row(5, image_correspondence=[3])
    rows[7] = rated_row(7, visual_dependency=[1, 5])
    rows[9] = rated_row(9, relevance=[2], formatting=[4, 2])  # counted under the first: relevance
    rows[10] = rated_row(10, **dict.fromkeys(RATINGS))  # no ratings at all
    return rows


def source_keys(directory, split):
    return [int(s["__key__"].rsplit("-", 1)[1]) for s in shard_samples(directory, split)]


def test_min_rating_drops_whole_rows_and_counts_why(tmp_path):
    write_rows(tmp_path / "src" / "rated" / "train-00000.parquet", rated_rows(12))
    convert = functools.partial(convert_finevision, tmp_path / "src", ["rated"], val_samples=0,
                                shard_size=100)  # fmt: skip
    result = convert(out_dir=tmp_path / "all")
    assert result["rated"] == {"train": 12, "val": 0, "skipped": {}}  # no filter: all kept
    result = convert(out_dir=tmp_path / "3", min_rating=3)
    assert result["rated"]["skipped"] == {
        "low_relevance": 2, "low_visual_dependency": 1, "unrated_relevance": 1
    }  # fmt: skip
    assert source_keys(tmp_path / "3" / "rated", "train") == [0, 1, 2, 4, 5, 6, 8, 11]
    result = convert(out_dir=tmp_path / "4", min_rating=4)
    assert result["rated"]["skipped"]["low_image_correspondence"] == 1  # row 5's 3 < 4
    assert source_keys(tmp_path / "4" / "rated", "train") == [0, 1, 2, 4, 6, 8, 11]
    result = convert(out_dir=tmp_path / "f", min_rating=3, rating_columns=["formatting"])
    assert result["rated"]["skipped"] == {"low_formatting": 1, "unrated_formatting": 1}
    with pytest.raises(ValueError, match="rating columns: relevence"):
        convert(out_dir=tmp_path / "x", min_rating=3, rating_columns=["relevence"])
    row = rated_row(0, relevance=None)
    row["relevance_min"] = 1  # no per-turn list: the row's minimum column is used
    with pytest.raises(BadSample, match="low_relevance"):
        check_ratings(row, 2)


def test_val_split_is_by_content_deterministic_and_disjoint(tmp_path):
    rows = rated_rows(40)
    write_rows(tmp_path / "src" / "rows" / "train-00000.parquet", rows)
    write_rows(tmp_path / "src" / "reversed" / "train-00000.parquet", rows[::-1])
    convert = functools.partial(convert_finevision, tmp_path / "src", val_samples=0, shard_size=7)
    result = convert(["rows", "reversed"], tmp_path / "a", val_fraction=0.25)
    val, train = (
        shard_samples(tmp_path / "a" / "rows", "val"),
        shard_samples(tmp_path / "a" / "rows", "train"),
    )

    def contents(samples):
        return [(s["0.jpg"], json.loads(s["json"])["texts"][0]["assistant"]) for s in samples]

    # every row exactly once; no val row (by key or by content) in train
    assert sorted(contents(val) + contents(train)) == sorted(
        (r["images"][0], r["texts"][0]["assistant"]) for r in rows
    )
    val_rows, train_rows = (
        source_keys(tmp_path / "a" / "rows", "val"),
        source_keys(tmp_path / "a" / "rows", "train"),
    )
    assert not set(val_rows) & set(train_rows) and not set(contents(val)) & set(contents(train))
    assert val_rows == [i for i, row in enumerate(rows) if draw(row) < 0.25]
    assert 5 <= len(val_rows) <= 15 and result["rows"]["val"] == len(val_rows)  # ~10 of 40
    # the same rows in another order: the same rows are val
    assert sorted(contents(shard_samples(tmp_path / "a" / "reversed", "val"))) == sorted(
        contents(val)
    )
    # deterministic: converted again, the same bytes; --val-samples 10 of 40 rows = 0.25
    convert(["rows"], tmp_path / "b", val_samples=10)
    for name in [*read_sizes(tmp_path / "a" / "rows"), "sizes.json"]:
        assert (tmp_path / "a" / "rows" / name).read_bytes() == (
            tmp_path / "b" / "rows" / name
        ).read_bytes()
    # fewer rows read, or rows filtered: no row changes side
    convert(["rows"], tmp_path / "c", val_fraction=0.25, max_samples=20, min_rating=3)
    kept = [i for i in range(20) if i not in (3, 7, 9, 10)]
    assert source_keys(tmp_path / "c" / "rows", "val") == [i for i in val_rows if i in kept]
    assert source_keys(tmp_path / "c" / "rows", "train") == [i for i in train_rows if i in kept]


def test_workers_give_the_same_shards(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finevision, "CHUNK_ROWS", 2)  # many chunks in flight per worker
    write_rows(tmp_path / "src" / "rated" / "train-00000.parquet", rated_rows(40))
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        argv = ["shards", "finevision", "--source", str(tmp_path / "src"), "--subsets", "rated"]
        argv += ["--out", str(out), "--val-fraction", "0.3", "--min-rating", "3", "--shard-size"]
        assert cli([*argv, "5", "--ratings", "relevance,formatting", "--workers", workers]) == 0
        outputs.append({p.name: p.read_bytes() for p in (out / "rated").iterdir()})
        printed = capsys.readouterr().out
        assert "skipped 3 rows (low_relevance 2, unrated_relevance 1)" in printed
    assert outputs[0] == outputs[1] and len(outputs[0]) > 4


def test_missing_sources_and_subsets_are_clear_errors(messy_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        convert_finevision(tmp_path / "nowhere", ["messy"], tmp_path / "o", 1, 10)
    with pytest.raises(FileNotFoundError, match="subsets in .*: messy"):
        convert_finevision(messy_dir, ["mesy"], tmp_path / "o", 1, 10)


# ------------------------------------------------------------------ decoders
@pytest.fixture(scope="module")
def processor(tokenizer):
    return ChatProcessor(tokenizer, IMAGE_TOKENS)


def train_decoder(processor, **kwargs):
    options = {"max_seq_len": 256, **kwargs}
    return VLMTrainDecoder(processor, SIZE, SIGLIP_MEAN, SIGLIP_STD, **options)


def test_train_decoder_on_converted_shards(processor, shards_dir):
    decode = train_decoder(processor)
    for subset, n in (("shapes_multiturn", 1), ("shapes_text", 0), ("shapes_two_images", 2)):
        sample = shard_samples(shards_dir / subset, "train")[0]
        out = decode(sample)
        assert set(out) == {"pixel_values", "input_ids", "labels"}
        assert out["pixel_values"].shape == (n, 3, SIZE, SIZE)
        assert out["pixel_values"].dtype == torch.float32
        if n:
            assert -1.0 <= out["pixel_values"].min() < out["pixel_values"].max() <= 1.0
        texts = json.loads(sample["json"])["texts"]
        ids, labels = processor.encode(texts, n)
        assert out["input_ids"].dtype == out["labels"].dtype == torch.int64
        assert out["input_ids"].tolist() == ids and out["labels"].tolist() == labels


def test_images_are_resized_whole_not_cropped(processor):
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (48, 0, 64, 32))  # the right quarter is blue
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    sample = raw_sample(qa(("q?", "a")), [buffer.getvalue()])
    pixels = train_decoder(processor)(sample)["pixel_values"][0]
    assert pixels[2, :, -2:].min() > 0.9 and pixels[0, :, -2:].max() < -0.9  # blue kept
    assert pixels[0, :, :4].min() > 0.9
    # the contrastive decoder centre-crops: its right edge is red
    cropped = ImageTextDecoder(SIZE, SIGLIP_MEAN, SIGLIP_STD, processor.tokenizer).image(
        {"jpg": buffer.getvalue()}
    )
    assert cropped[0, :, -2:].min() > 0.9


@pytest.mark.parametrize(
    "sample, options, reason",
    [
        (raw_sample(qa(("q?", "a")), [jpeg()]), {"max_seq_len": 20}, "too_long"),
        (raw_sample(qa(("q?", "a")), [b"garbage"]), {}, "bad_image"),
        (raw_sample(qa(("q?", "a")), [jpeg()], num_images=2), {}, "image_count_mismatch"),
        (raw_sample(qa(("q?", "a")), [jpeg(), jpeg()]), {"max_images": 1}, "too_many_images"),
        (raw_sample(qa(("q?", " "), ("r?", "")), [jpeg()]), {}, "no_supervised_tokens"),
        (raw_sample([], [jpeg()]), {}, "empty_texts"),
        (raw_sample([{"user": "q"}, "x"], []), {}, "bad_texts"),
        (raw_sample(qa(("q <|image_pad|>", "a")), [jpeg()]), {}, "special_token_in_text"),
        (raw_sample(qa(("q?", "a")), [jpeg((300, 300))]), {"max_pixels": 100}, "too_large"),
        ({"__key__": "k", "0.jpg": jpeg()}, {}, "missing_json"),
        ({"__key__": "k", "json": b"{not json"}, {}, "bad_json"),
        ({"__key__": "k", "json": b'{"texts": []}'}, {}, "bad_json"),
    ],
)
def test_train_decoder_bad_samples(processor, sample, options, reason):
    with pytest.raises(BadSample) as caught:
        train_decoder(processor, **options)(sample)
    assert caught.value.reason == reason


def test_image_members_with_a_gap_mismatch(processor):
    sample = raw_sample(qa(("q?", "a")), [jpeg(), jpeg()])
    sample["2.jpg"] = sample.pop("1.jpg")
    with pytest.raises(BadSample, match="image_count_mismatch"):
        train_decoder(processor)(sample)


def test_eval_decoder(processor, shards_dir):
    decode = VLMEvalDecoder(processor, SIZE, SIGLIP_MEAN, SIGLIP_STD, max_images=4)
    sample = shard_samples(shards_dir / "shapes_multiturn", "val")[0]
    out = decode(sample)
    texts = json.loads(sample["json"])["texts"]
    assert set(out) == {"pixel_values", "prompt_ids", "answer", "answers", "source", "key"}
    assert out["answers"] == [out["answer"]]  # no "answers" in the json: the last turn alone
    assert out["prompt_ids"].tolist() == processor.prompt(texts, 1)
    assert out["prompt_ids"].dtype == torch.int64
    assert out["answer"] == texts[-1]["assistant"] and out["source"] == "shapes_multiturn"
    assert out["key"] == "shapes_multiturn-val-000000000"
    assert out["pixel_values"].shape == (1, 3, SIZE, SIZE)
    with pytest.raises(BadSample, match="empty_answer"):
        decode(raw_sample(qa(("q?", "a"), ("r?", " ")), [jpeg()]))
    short = VLMEvalDecoder(processor, SIZE, SIGLIP_MEAN, SIGLIP_STD, max_prompt_len=10)
    with pytest.raises(BadSample, match="too_long"):
        short(sample)


def test_decoded_shards_stream_into_packed_batches(processor, shards_dir):
    urls = [str(p) for s in VQA_SUBSETS for p in sorted((shards_dir / s).glob("train-*.tar"))]
    pad_id = processor.tokenizer.pad_token_id
    collate = PackedCollate(256, pad_id, processor.image_pad_id, IMAGE_TOKENS)
    stream = ShardStream(
        urls,
        decode=train_decoder(processor),
        collate=collate,
        batch_size=8,
        num_workers=0,
        epochs=1,
        drop_last=False,
    )
    batches = list(stream)
    assert sum(b["num_samples"] for b in batches) == 12 * len(VQA_SUBSETS)
    images = sum(len(b["pixel_values"]) for b in batches)
    assert images == 12 * (6 * 1 + 0 + 2)  # six one-image subsets, text-only, two-image


# ------------------------------------------------------------------ CLI
def test_cli_synthetic_vqa_then_finevision(tmp_path, capsys):
    parquet, shards = tmp_path / "pq", tmp_path / "wds"
    argv = ["shards", "synthetic-vqa", "--out", str(parquet), "--train", "6", "--val", "2"]
    assert cli([*argv, "--seed", "1", "--image-size", "24"]) == 0
    assert "64 rows in 16 parquet files" in capsys.readouterr().out
    assert (parquet / "tokenizer" / "tokenizer.json").is_file()
    first = pq.read_table(parquet / "shapes_count" / "train-00000.parquet")["texts"].to_pylist()
    assert first[0] == vqa_row("shapes_count", 1, "train", 0, 24)["texts"]

    argv = [
        "shards",
        "finevision",
        "--source",
        str(parquet),
        "--out",
        str(shards),
        "--subsets",
        "shapes_colour, shapes_text",
        "--val-samples",
        "1",
        "--shard-size",
        "4",
    ]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "shapes_colour: 6 train, 1 val samples" in out and "shapes_text: 6 train" in out
    sizes = {"train-000000.tar": 4, "train-000001.tar": 2, "val-000000.tar": 1}
    assert read_sizes(shards / "shapes_text") == sizes
    assert not (shards / "shapes_count").exists()
    assert (shards / "tokenizer" / "tokenizer.json").is_file()
    assert cli([*argv[:-6], "--subsets", "nope"]) == 2
    assert "no train-*.parquet" in capsys.readouterr().err


def test_row_conversion_details():
    row = good_row(1)
    row["images"] = [{"bytes": None, "path": "elsewhere.jpg"}]
    with pytest.raises(BadSample, match="missing_image"):
        convert_row(row, "s")
    for image_format, ext in (("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif"), ("GIF", "gif")):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format=image_format)
        assert image_extension(buffer.getvalue()) == ext
    texts = [{"user": None, "assistant": "yes"}]
    fields = convert_row({"images": [], "texts": texts, "source": "", "score": [1, 2]}, "sub")
    record = json.loads(fields.pop("json"))
    assert record == {
        "texts": [{"user": "", "assistant": "yes"}], "source": "sub", "num_images": 0,
        "score": [1, 2],
    }  # fmt: skip
    assert fields == {}
