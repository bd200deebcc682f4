"""Synthetic "shapes" data: one to three coloured shapes on a plain background, fully seeded.

Each sample is a dict of attributes (shapes: colour/shape/size/position/jitter, background,
count); the image, caption, question-answer pairs, chain-of-thought and preference pair are
pure functions of it. Shapes sit one per cell of a 3x3 grid, so they never overlap, and the
caption lists them in reading order, so an image has exactly one caption. About 10^3 single-
shape and 10^6+ multi-shape captions exist: retrieval is learnable (colour, shape, size and
position must all be bound) and 512 validation captions are almost all distinct.

`write_finevision_parquet` writes the same scenes as FineVision-format parquet (one directory
per subset: colour, shape, count and position questions, captions, multi-turn, text-only and
two-image conversations) plus a tokenizer with Qwen2.5's chat specials, for the staged VLM.
`write_llava_cot_jsonl` writes scenes' chains of thought in LLaVA-CoT-100k's layout (jsonl +
images), which `vlscale shards llava-cot` converts to CoT shards as it does the real dataset.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from pathlib import Path

from PIL import Image, ImageDraw

from core.data.shards import write_sizes, write_tar
from core.data.tokenizer import train_bpe_tokenizer, train_vlm_tokenizer

log = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 130, 190),
    "brown": (130, 80, 40),
}
BACKGROUNDS = {
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
    "beige": (225, 210, 170),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.18, "medium": 0.28, "large": 0.38}  # radius as a fraction of a grid cell
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
COUNT_WEIGHTS = {1: 1, 2: 2, 3: 2}  # fewer single-shape images: their captions repeat most
JITTER = 2  # shapes move up to JITTER/20 of a cell: max radius + jitter stays inside the cell
NUMBERS = ("zero", "one", "two", "three")
JPEG_QUALITY = 95


def sample_attributes(rng: random.Random) -> dict:
    count = rng.choices(list(COUNT_WEIGHTS), weights=list(COUNT_WEIGHTS.values()))[0]
    cells = sorted(rng.sample(range(len(POSITIONS)), count))
    shapes = [
        {
            "colour": rng.choice(list(COLOURS)),
            "shape": rng.choice(SHAPES),
            "size": rng.choice(list(SIZES)),
            "position": POSITIONS[cell],
            "jitter": [rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)],
        }
        for cell in cells
    ]
    return {"shapes": shapes, "background": rng.choice(list(BACKGROUNDS)), "count": count}


def render(attributes: dict, image_size: int = 64) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[attributes["background"]])
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    for shape in attributes["shapes"]:
        row, col = divmod(POSITIONS.index(shape["position"]), 3)
        cx = (col + 0.5 + shape["jitter"][0] / 20) * cell
        cy = (row + 0.5 + shape["jitter"][1] / 20) * cell
        _draw_shape(draw, shape["shape"], cx, cy, SIZES[shape["size"]] * cell, shape["colour"])
    return image


def encode(image: Image.Image, image_format: str = "JPEG") -> bytes:
    """The image's file bytes as the shards store them (JPEG at JPEG_QUALITY by default)."""
    buffer = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if image_format == "JPEG" else {}
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour):
    fill = COLOURS[colour]
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        side = 0.85 * r
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    elif kind == "triangle":
        draw.polygon(((cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)), fill=fill)
    else:  # cross
        arm = 0.32 * r
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)


def describe(shape: dict) -> str:
    return f"{shape['size']} {shape['colour']} {shape['shape']}"


def caption(attributes: dict) -> str:
    """E.g. "a large red circle at the top left and a small blue square at the bottom right
    on a gray background"."""
    parts = [f"a {describe(s)} at the {s['position']}" for s in attributes["shapes"]]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on a {attributes['background']} background"


def _alternatives(names) -> str:
    # longest first, so that "top left" is tried before "top"
    return "|".join(sorted(map(re.escape, names), key=len, reverse=True))


_SHAPE_PHRASE = re.compile(
    rf"a (?P<size>{_alternatives(SIZES)}) (?P<colour>{_alternatives(COLOURS)}) "
    rf"(?P<shape>{_alternatives(SHAPES)}) at the (?P<position>{_alternatives(POSITIONS)})"
)
_CAPTION = re.compile(
    rf"(?P<listed>.+) on a (?P<background>{_alternatives(BACKGROUNDS)}) background"
)


def parse_caption(text: str) -> dict | None:
    """The inverse of `caption`: {"shapes": [{size, colour, shape, position}] in the caption's
    order, "background", "count"} (no jitter: a caption does not say it), or None when the text
    is not a caption of this form (how a generated caption is scored attribute by attribute).
    Case and whitespace are not significant."""
    match = _CAPTION.fullmatch(" ".join(text.lower().split()))
    if match is None:
        return None
    *first, last = match["listed"].split(" and ")
    if len(first) > 1:  # "and" joins only the last two: "x, y and z"
        return None
    parts = first[0].split(", ") + [last] if first else [last]
    shapes = []
    for part in parts:
        phrase = _SHAPE_PHRASE.fullmatch(part)
        if phrase is None:
            return None
        shapes.append({k: phrase[k] for k in ("size", "colour", "shape", "position")})
    return {"shapes": shapes, "background": match["background"], "count": len(shapes)}


def questions(attributes: dict) -> list[dict]:
    """Question-answer pairs that the attributes answer unambiguously."""
    shapes = attributes["shapes"]
    qa = [
        {"question": "How many shapes are there?", "answer": NUMBERS[len(shapes)]},
        {"question": "What colour is the background?", "answer": attributes["background"]},
    ]
    descriptions = [describe(s) for s in shapes]
    for shape, description in zip(shapes, descriptions):
        where = f"at the {shape['position']}"
        qa += [
            {"question": f"What colour is the shape {where}?", "answer": shape["colour"]},
            {"question": f"What shape is {where}?", "answer": shape["shape"]},
            {"question": f"How big is the shape {where}?", "answer": shape["size"]},
        ]
        if descriptions.count(description) == 1:
            qa.append({"question": f"Where is the {description}?", "answer": shape["position"]})
    empty = [p for p in POSITIONS if p not in {s["position"] for s in shapes}]
    qa.append({"question": f"Is there a shape at the {empty[0]}?", "answer": "no"})
    qa.append({"question": f"Is there a shape at the {shapes[0]['position']}?", "answer": "yes"})
    return qa


COT_KINDS = ("count", "colour", "shape")


def chain_of_thought(attributes: dict, kind: str = "count", which: int = 0) -> dict:
    """A question about a scene, reasoned before it is answered: `count` (how many shapes have
    the first shape's colour: every shape listed, those of the colour picked, counted), `colour`
    or `shape` (of shape `which`, modulo the count, asked by its position: the staged-VLM demo's
    VQA questions, as stage 2 asks them). The latter two come with their own "caption"
    (LLaVA-CoT's CAPTION section, which otherwise holds the whole scene's caption) naming the
    attribute asked about, then describing the shape. Ask about every shape, not always the
    first: trained on questions about the first shape only, the demo model learned to answer
    with the first shape's colour wherever the question pointed (colour answers 0.89 -> 0.60)."""
    shapes = attributes["shapes"]
    if kind in ("colour", "shape"):
        asked = shapes[which % len(shapes)]
        where = f"at the {asked['position']}"
        question = (f"What colour is the shape {where}?" if kind == "colour"
                    else f"What shape is {where}?")  # fmt: skip
        return {
            "question": question,
            "caption": f"The shape {where} is {asked[kind]}: a {describe(asked)}.",
            "reasoning": f"The question asks for its {kind}, so the answer is {asked[kind]}.",
            "answer": asked[kind],
        }
    if kind != "count":
        raise ValueError(f"chain_of_thought kind {kind!r}; valid: {', '.join(COT_KINDS)}")
    colour = shapes[0]["colour"]
    matching = [s for s in shapes if s["colour"] == colour]
    seen = "; ".join(f"a {describe(s)} at the {s['position']}" for s in shapes)
    reasoning = (
        f"I see {NUMBERS[len(shapes)]} shape{'s' if len(shapes) > 1 else ''}: {seen}. "
        + f"The {colour} one{'s are' if len(matching) > 1 else ' is'} "
        + " and ".join(f"the {describe(s)}" for s in matching)
        + f", so there {'are' if len(matching) > 1 else 'is'} {NUMBERS[len(matching)]}."
    )
    return {
        "question": f"How many {colour} shapes are there?",
        "reasoning": reasoning,
        "answer": NUMBERS[len(matching)],
    }


def preference_pair(attributes: dict) -> dict:
    """Chosen: the true caption; rejected: the same with the first shape's colour changed."""
    wrong = json.loads(json.dumps(attributes))
    names = list(COLOURS)
    first = wrong["shapes"][0]
    first["colour"] = names[(names.index(first["colour"]) + 1) % len(names)]
    return {
        "prompt": "Describe the image.",
        "chosen": caption(attributes),
        "rejected": caption(wrong),
    }


def class_problems(attributes: list[dict]) -> list[tuple[str, list[str], list[int]]]:
    """Zero-shot classification problems over these images: (name, one prompt per class, the
    class of each image or -1). Colour and shape are labelled only on one-shape images (with
    several shapes neither has one answer); the background always."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)

    def single(a, field, classes):
        return classes.index(a["shapes"][0][field]) if len(a["shapes"]) == 1 else -1

    return [
        ("colour", [f"a {c} shape" for c in colours],
         [single(a, "colour", colours) for a in attributes]),
        ("shape", [f"a {s}" for s in SHAPES],
         [single(a, "shape", list(SHAPES)) for a in attributes]),
        ("background", [f"shapes on a {b} background" for b in backgrounds],
         [backgrounds.index(a["background"]) for a in attributes]),
    ]  # fmt: skip


def make_sample(seed: int, split: str, index: int, image_size: int = 64) -> tuple[bytes, dict]:
    """(JPEG bytes, record) of sample `index` of `split`; independent of every other sample."""
    attributes = sample_attributes(random.Random(f"shapes/{seed}/{split}/{index}"))
    record = {
        **attributes,
        "caption": caption(attributes),
        "qa": questions(attributes),
        "cot": chain_of_thought(attributes),
        "preference": preference_pair(attributes),
    }
    return encode(render(attributes, image_size)), record


def record_texts(record: dict) -> list[str]:
    """Every text of a record, for tokenizer training."""
    texts = [record["caption"], record["cot"]["question"], record["cot"]["reasoning"]]
    texts += [record["preference"]["prompt"], record["preference"]["rejected"]]
    for pair in record["qa"]:
        texts += [pair["question"], pair["answer"]]
    return texts


def write_synthetic_shards(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    seed: int,
    shard_size: int = 1000,
    image_size: int = 64,
    vocab_size: int = 1024,
) -> dict[str, int]:
    """Write `train-%06d.tar` / `val-%06d.tar` shards, sizes.json and a BPE tokenizer trained
    on the train texts into `out_dir/tokenizer`. Returns {shard name: sample count}."""
    if n_train < 1:
        raise ValueError("n_train must be at least 1: the tokenizer is trained on train texts")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    train_texts: list[str] = []
    for split, total in (("train", n_train), ("val", n_val)):
        for shard, start in enumerate(range(0, total, shard_size)):
            indices = range(start, min(start + shard_size, total))
            texts = train_texts if split == "train" else None
            samples = _shard_samples(seed, split, indices, image_size, texts)
            name = f"{split}-{shard:06d}.tar"
            sizes[name] = write_tar(out_dir / name, samples)
            log.info("wrote %s (%d samples)", out_dir / name, sizes[name])
    write_sizes(out_dir, sizes, merge=False)
    train_bpe_tokenizer(train_texts, out_dir / "tokenizer", vocab_size=vocab_size)
    return sizes


def _shard_samples(seed: int, split: str, indices: range, image_size: int, texts: list | None):
    for index in indices:
        jpeg, record = make_sample(seed, split, index, image_size)
        if texts is not None:
            texts.extend(record_texts(record))
        fields = {
            "jpg": jpeg,
            "txt": record["caption"].encode(),
            "json": json.dumps(record, separators=(",", ":")).encode(),
        }
        yield f"{index:09d}", fields


# ------------------------------------------------------------------ FineVision-format parquet
VQA_SUBSETS = (
    "shapes_colour",  # "What colour is the shape at the top left?" -> "red"
    "shapes_shape",  # "What shape is at the top left?" -> "circle"
    "shapes_count",  # "How many shapes are there?" -> "two"
    "shapes_position",  # "Where is the large red circle?" -> "top left"
    "shapes_caption",  # "Describe the image." -> the caption
    "shapes_multiturn",  # 2-4 questions about one image
    "shapes_text",  # no image: the caption is in the question
    "shapes_two_images",  # "Which image has more shapes?" -> "the first" / "the second"
)
# Single-turn subsets ask one of questions()'s questions that starts with this.
QUESTION_PREFIX = {
    "shapes_colour": "What colour is the shape at ",
    "shapes_shape": "What shape is at ",
    "shapes_count": "How many shapes are there?",
    "shapes_position": "Where is the ",
}
CAPTION_PROMPT = "Describe the image."
MORE_OR_FEWER = ("more", "fewer")
ORDINALS = ("the first", "the second")
# FineVision's quality ratings: a list (one per turn) and its minimum per rating; ours are all 5.
RATINGS = ("relevance", "image_correspondence", "formatting", "visual_dependency")
SYNTHETIC_RATING = 5


def vqa_row(subset: str, seed: int, split: str, index: int, image_size: int = 64) -> dict:
    """Row `index` of `subset`'s `split` as FineVision holds it: {"images": [encoded bytes],
    "texts": [{"user", "assistant"}], "source"}. Independent of every other row."""
    scenes, texts = vqa_conversation(subset, seed, split, index)
    # PNG for the two-image subset, so that converted shards hold more than one image format
    image_format = "PNG" if subset == "shapes_two_images" else "JPEG"
    encoded = [encode(render(a, image_size), image_format) for a in scenes]
    return {"images": encoded, "texts": texts, "source": subset}


def vqa_conversation(subset: str, seed: int, split: str, index: int) -> tuple[list, list]:
    """(attributes of each image, turns) of row `index` of `subset`'s `split`."""
    rng = random.Random(f"vqa/{seed}/{split}/{subset}/{index}")
    attributes = sample_attributes(rng)
    scenes = [attributes]
    if subset in QUESTION_PREFIX:
        candidates = _questions_with(attributes, QUESTION_PREFIX[subset])
        while not candidates:  # "Where is ...?" needs a shape whose description is unique
            attributes = scenes[0] = sample_attributes(rng)
            candidates = _questions_with(attributes, QUESTION_PREFIX[subset])
        pair = rng.choice(candidates)
        texts = [{"user": pair["question"], "assistant": pair["answer"]}]
    elif subset == "shapes_caption":
        texts = [{"user": CAPTION_PROMPT, "assistant": caption(attributes)}]
    elif subset == "shapes_multiturn":
        pairs = rng.sample(questions(attributes), rng.randint(2, 4))
        texts = [{"user": p["question"], "assistant": p["answer"]} for p in pairs]
    elif subset == "shapes_text":
        pair = rng.choice(questions(attributes))
        user = f"The picture shows {caption(attributes)}. {pair['question']}"
        texts, scenes = [{"user": user, "assistant": pair["answer"]}], []
    elif subset == "shapes_two_images":
        other = sample_attributes(rng)
        while other["count"] == attributes["count"]:  # the answer must be unambiguous
            other = sample_attributes(rng)
        scenes.append(other)
        word = rng.choice(MORE_OR_FEWER)
        second_has_more = other["count"] > attributes["count"]
        answer = ORDINALS[int(second_has_more == (word == "more"))]
        texts = [{"user": f"Which image has {word} shapes?", "assistant": answer}]
    else:
        raise ValueError(f"unknown subset {subset!r}; the subsets are {', '.join(VQA_SUBSETS)}")
    return scenes, texts


def _questions_with(attributes: dict, prefix: str) -> list[dict]:
    return [pair for pair in questions(attributes) if pair["question"].startswith(prefix)]


def finevision_features():
    """FineVision's columns as `datasets` declares them (images: a list of Image; texts: a list
    of {user, assistant}; source; the quality ratings)."""
    from datasets import Features, Image, List, Value

    features = {
        "images": List(Image()),
        "texts": List({"user": Value("string"), "assistant": Value("string")}),
        "source": Value("string"),
    }
    for name in RATINGS:
        features[f"{name}_ratings"] = List(Value("int64"))
        features[f"{name}_min"] = Value("int64")
    return Features(features)


def write_finevision_parquet(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    seed: int,
    image_size: int = 64,
    subsets: tuple[str, ...] | list[str] = VQA_SUBSETS,
    vocab_size: int = 1024,
) -> dict[str, int]:
    """Write `out_dir/<subset>/train-00000.parquet` (n_train rows) and `val-00000.parquet`
    (n_val rows; none when 0) per subset in FineVision's layout, and a tokenizer with Qwen2.5's
    chat specials trained on the train texts into `out_dir/tokenizer`.
    Returns {"<subset>/<file>": rows}."""
    if n_train < 1:
        raise ValueError("n_train must be at least 1: the tokenizer is trained on train texts")
    unknown = [s for s in subsets if s not in VQA_SUBSETS]
    if unknown:
        raise ValueError(f"unknown subsets {unknown}; the subsets are {', '.join(VQA_SUBSETS)}")
    from datasets import Dataset

    out_dir = Path(out_dir)
    features = finevision_features()
    written: dict[str, int] = {}
    train_texts: list[str] = []
    for subset in subsets:
        (out_dir / subset).mkdir(parents=True, exist_ok=True)
        for split, total in (("train", n_train), ("val", n_val)):
            if total == 0:
                continue
            rows = [vqa_row(subset, seed, split, i, image_size) for i in range(total)]
            if split == "train":
                train_texts += [t[k] for row in rows for t in row["texts"] for k in t]
            name = f"{subset}/{split}-00000.parquet"
            columns = _finevision_columns(rows, features)
            _write_parquet(Dataset.from_dict(columns, features=features), out_dir / name)
            written[name] = total
            log.info("wrote %s (%d rows)", out_dir / name, total)
    train_vlm_tokenizer(train_texts, out_dir / "tokenizer", vocab_size=vocab_size)
    return written


def _finevision_columns(rows: list[dict], features) -> dict[str, list]:
    columns = {name: [] for name in features}
    for row in rows:
        columns["images"].append([{"bytes": data, "path": None} for data in row["images"]])
        columns["texts"].append(row["texts"])
        columns["source"].append(row["source"])
        for name in RATINGS:
            columns[f"{name}_ratings"].append([SYNTHETIC_RATING] * len(row["texts"]))
            columns[f"{name}_min"].append(SYNTHETIC_RATING)
    return columns


def _write_parquet(dataset, path: Path) -> None:
    """Atomically (temporary name, then rename), without datasets' progress bar."""
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    tmp = path.with_name(path.name + ".tmp")
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        dataset.to_parquet(str(tmp))
        os.replace(tmp, path)
    finally:
        if not was_disabled:
            enable_progress_bars()
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ LLaVA-CoT-layout rows
def cot_parts(record: dict, cot: dict) -> tuple[str, str, str]:
    """LLaVA-CoT's SUMMARY (the plan), CAPTION (the chain's own, else the record's caption) and
    REASONING of a shapes record's chain of thought `cot` (chain_of_thought)."""
    if cot["question"].startswith("How many"):
        colour = record["shapes"][0]["colour"]
        summary = f"I will list every shape with its colour, then count the {colour} ones."
    else:
        summary = "I will describe the shape asked about, then answer."
    caption = cot.get("caption") or f"The image shows {record['caption']}."
    return summary, caption, cot["reasoning"]


def llava_cot_answer(record: dict, cot: dict | None = None) -> str:
    """A shapes record's chain of thought (`cot`, default its "cot") as LLaVA-CoT's tagged
    answer: SUMMARY, CAPTION, REASONING (cot_parts) and CONCLUSION."""
    cot = cot or record["cot"]
    summary, caption, reasoning = cot_parts(record, cot)
    return (
        f"<SUMMARY> {summary} </SUMMARY>\n\n"
        f"<CAPTION> {caption} </CAPTION>\n\n"
        f"<REASONING> {reasoning} </REASONING>\n\n"
        f"<CONCLUSION> {cot['answer']} </CONCLUSION>"
    )


def write_llava_cot_jsonl(out_dir: str | Path, rows: int, seed: int, image_size: int = 64) -> Path:
    """Write `rows` shapes scenes (split "cot": none of the shapes shards' scenes), row i asking
    the question of kind COT_KINDS[i % 3] (chain_of_thought), in
    Xkev/LLaVA-CoT-100k's layout: `out_dir/train.jsonl` rows {"id", "image" (a path relative to
    out_dir), "conversations": [{"from": "human", "value": "<image>\\n" + question}, {"from":
    "gpt", "value": llava_cot_answer}]} and the JPEGs under `out_dir/images/`, for `vlscale
    shards llava-cot --source OUT/train.jsonl --images OUT` to convert as it converts the real
    dataset. Returns the jsonl's path."""
    if rows < 1:
        raise ValueError("rows must be at least 1")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / "train.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as lines:
        for index in range(rows):
            jpeg, record = make_sample(seed, "cot", index, image_size)
            # which shape a colour or shape question asks about: every one in turn
            cot = chain_of_thought(record, COT_KINDS[index % len(COT_KINDS)], index // 3)
            image = f"images/{index:09d}.jpg"
            (out_dir / image).write_bytes(jpeg)
            row = {
                "id": f"shapes-{index:09d}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + cot["question"]},
                    {"from": "gpt", "value": llava_cot_answer(record, cot)},
                ],
            }
            lines.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    log.info("wrote %s (%d rows) and their images", path, rows)
    return path


# ------------------------------------------------------------------ RLAIF-V-layout rows
RLAIF_V_COLUMNS = ("ds_name", "image", "question", "chosen", "rejected", "origin_dataset",
                   "origin_split", "idx", "image_path")  # fmt: skip


PREFERENCE_ERRORS = ("hallucination", "conclusion")


def reasoned_preference(record: dict, kind: str, which: int = 0, fmt: str = "think",
                        error: str = "hallucination", shift: int = 1) -> dict:  # fmt: skip
    """A preference pair over the colour or shape (`kind`) of a scene's shape `which`, both
    responses reasoned in CoT format `fmt` as stage 3 renders them (core/data/cot.py): chosen
    the true chain of thought; rejected the same with that attribute replaced by the one
    `shift` places on in the attribute's list, either throughout (`error="hallucination"`: the
    shape misdescribed and the answer wrong, as RLAIF-V's rejected responses are) or in the
    final answer only (`"conclusion"`: right reasoning, an answer that does not follow from it).

    Why both: with hallucinations alone every rejected answer repeats its reasoning, and DPO
    taught the demo model to answer something other than what it had just reasoned (stage 3's
    colour 0.92 -> 0.71 after stage 4); conclusion errors make answering what the reasoning
    says the preferred behaviour (BENCHMARKS.md, stages 3 and 4)."""
    from core.data.cot import render_target

    if error not in PREFERENCE_ERRORS:
        raise ValueError(f"error must be one of {PREFERENCE_ERRORS}, got {error!r}")
    names = list(COLOURS) if kind == "colour" else list(SHAPES)
    if shift % len(names) == 0:
        raise ValueError(f"shift {shift} gives back the true {kind}")
    wrong = json.loads(json.dumps(record))
    asked = wrong["shapes"][which % len(wrong["shapes"])]
    asked[kind] = names[(names.index(asked[kind]) + shift) % len(names)]
    responses = []
    for rejected, scene in enumerate((record, wrong if error == "hallucination" else record)):
        cot = chain_of_thought(scene, kind, which)
        parts = cot_parts(scene, cot)
        reasoned = {
            "question": cot["question"],
            "reasoning": "\n\n".join(parts),
            "answer": cot["answer"],
            "reasoning_parts": dict(zip(("summary", "caption", "reasoning"), parts)),
        }
        if rejected:
            reasoned["answer"] = asked[kind]
        responses.append(render_target(fmt, reasoned).text)  # fmt: skip
    return {"question": chain_of_thought(record, kind, which)["question"], "chosen": responses[0],
            "rejected": responses[1]}  # fmt: skip


def write_rlaif_v_parquet(out_dir: str | Path, rows: int, seed: int, image_size: int = 64,
                          fmt: str = "think") -> Path:  # fmt: skip
    """Write `rows` shapes scenes (split "preference": none of the other splits' scenes) as
    openbmb/RLAIF-V-Dataset's parquet (`out_dir/RLAIF-V-Dataset_000.parquet`, its columns),
    row i a `reasoned_preference` pair over the colour of shape i (modulo the count: every
    shape in turn), a hallucination in even rows and a wrong conclusion in odd ones (colour
    only: the demo model perceives colour, and shape stays at chance whatever stage 4 does, so
    shape pairs teach a ranking it cannot see), for
    `vlscale shards rlaif-v --source OUT` to convert as it converts the real dataset."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    if rows < 1:
        raise ValueError("rows must be at least 1")
    columns: dict[str, list] = {name: [] for name in RLAIF_V_COLUMNS}
    for index in range(rows):
        jpeg, record = make_sample(seed, "preference", index, image_size)
        # odd rows: a wrong conclusion from right reasoning; the wrong colour varies by row
        error = PREFERENCE_ERRORS[index % 2]
        shift = 1 + (index // 2) % (len(COLOURS) - 1)
        pair = reasoned_preference(record, "colour", index, fmt, error, shift)
        row = {"ds_name": "shapes", "image": {"bytes": jpeg, "path": None}, **pair,
               "origin_dataset": "shapes", "origin_split": json.dumps({"format": fmt}),
               "idx": str(index), "image_path": f"shapes/{index:09d}.jpg"}  # fmt: skip
        for name in RLAIF_V_COLUMNS:
            columns[name].append(row[name])
    features = Features({name: ImageFeature() if name == "image" else Value("string")
                         for name in RLAIF_V_COLUMNS})  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "RLAIF-V-Dataset_000.parquet"
    _write_parquet(Dataset.from_dict(columns, features=features), path)
    log.info("wrote %s (%d preference pairs)", path, rows)
    return path
