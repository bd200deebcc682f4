"""Public preference and chain-of-thought datasets -> webdataset shards for the staged VLM's
CoT SFT (stage 3) and DPO (stage 4) stages, from local copies of the files.

Shard schema. One image per sample: `{key}.{ext}` (the source's bytes, ext from their format:
jpg, png or webp; any other format is re-encoded losslessly as png) and `{key}.json`:

- preference: {"prompt", "chosen", "rejected", "source", "num_images": 1, and the source's
  plain metadata columns}.
- chain of thought: {"question", "reasoning", "answer", "source" (the dataset whose layout the
  row has), "num_images": 1, "format" (the answer tags: "llava_cot" or "r1"), "row", "turn",
  "image_path", "id" and "caption" (when the row has them), and for format "llava_cot"
  "reasoning_parts": {"summary", "caption", "reasoning"}}. "reasoning" is always one string:
  for LLaVA-CoT its three parts joined by a blank line, in that order, so a reader that wants
  plain reasoning text needs nothing else; "reasoning_parts" keeps them apart for a task that
  renders LLaVA-CoT's own <SUMMARY>/<CAPTION>/<REASONING> tags. "answer" is the conclusion.

The synthetic shapes shards (core/data/synthetic.py) carry the same fields, nested in their
record: record["preference"] = {prompt, chosen, rejected} (`preference_pair`) and record["cot"]
= {question, reasoning, answer} (`chain_of_thought`). `preference_fields` / `cot_fields` read
those fields from either kind of record, so a decoder can serve both. Prompts, questions and
responses carry no image token (a leading or trailing "<image>" is removed; one inside the text
skips the sample): the image's place is the chat template's business, as for FineVision.

Sources (the layouts were taken from the dataset cards; nothing here was run on the real files):

- openbmb/RLAIF-V-Dataset: parquet files (`RLAIF-V-Dataset_NNN.parquet`) with columns ds_name,
  image (an Image: {bytes, path}), question, chosen, rejected, origin_dataset, origin_split, idx,
  image_path (all strings but image). prompt = question; ds_name, origin_dataset, origin_split,
  idx and image_path are kept in the json.
- HuggingFaceH4/rlaif-v_formatted (TRL's conversational layout of the same data; data/train-*
  and data/test-* parquet): images (a list of Image), prompt = [{"role": "user", "content":
  [{"type": "image", "text": null}, {"type": "text", "text": question}]}], chosen / rejected =
  [{"role": "assistant", "content": [{"type": "text", "text": ...}]}]. The files given are one
  pool: give only the train files to keep H4's test rows out of training.
- Xkev/LLaVA-CoT-100k: train.jsonl rows {"id", "image" (a path relative to the unzipped image
  directory), "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value":
  "<SUMMARY>...</SUMMARY><CAPTION>...</CAPTION><REASONING>...</REASONING><CONCLUSION>...
  </CONCLUSION>"}, ...]}. A row may hold several question-answer turns about its image; the
  dataset's generator (PKU-YuanGroup/LLaVA-CoT dataset_generation/generate.py) wrote each
  answer from the image and that turn's question alone, so each turn becomes its own sample.
- R1 format (tags "r1"): answers "<think>reasoning</think><answer>answer</answer>", either in
  rows of the LLaVA-CoT layout above or in di-zhang-fdu/llava-cot-100k-r1-format's (parquet;
  columns images: [path relative to LLaVA-CoT-100k's images], problem, answer, caption; its card
  names it a GRPO set, and its rows were not seen: an answer without the tags is counted as
  bad_tags, so a conversion of rows that hold a bare answer writes nothing and says why).

An answer must be exactly the tagged sections, in order, each once and non-empty, with nothing
but whitespace around them; one that is not is skipped and counted as bad_tags (never cut down
to what parses). Every other unusable row or turn is skipped and counted by reason, as the
FineVision converter does.

Validation split. A sample goes to val when a number drawn from its image's bytes is below
`val_fraction`, so every pair or turn about one image lands on the same side (RLAIF-V can pair
several responses to one question; LLaVA-CoT rows ask several questions about one image): no
image's bytes are in both val and train, and a sample's side depends on nothing but its image
and the fraction.

Output: `<out>/{train,val}-NNNNNN.tar`, keys `<stem>-<split>-<index:09d>` (stem rlaif_v,
llava_cot or llava_cot_r1; index: the row for RLAIF-V, the turn counted over all rows read for
LLaVA-CoT), and `<out>/sizes.json`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image

from core.data.errors import BadSample
from core.data.finevision import (
    LOG_EVERY,
    LOG_SKIPPED,
    VAL_HASH_PERSON,
    SplitWriter,
    finish_conversion,
    image_extension,
)

log = logging.getLogger(__name__)

RLAIF_V_REPO = "openbmb/RLAIF-V-Dataset"
RLAIF_V_FORMATTED_REPO = "HuggingFaceH4/rlaif-v_formatted"
LLAVA_COT_REPO = "Xkev/LLaVA-CoT-100k"
LLAVA_COT_R1_REPO = "di-zhang-fdu/llava-cot-100k-r1-format"
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
COT_FIELDS = ("question", "reasoning", "answer")
# RLAIF-V's columns kept in the json beside the texts
RLAIF_V_METADATA = ("ds_name", "origin_dataset", "origin_split", "idx", "image_path")
TAGS = ("llava_cot", "r1")
LLAVA_COT_SECTIONS = ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")
R1_SECTIONS = ("think", "answer")
KEPT_FORMATS = ("jpg", "png", "webp")  # stored as they are; others re-encoded as png
PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")
IMAGE_TOKEN = "<image>"
PARQUET_BATCH = 256  # rows per record batch read from a parquet file


def _tagged(sections: tuple[str, ...]) -> re.Pattern:
    body = r"\s*".join(rf"<{name}>(.*?)</{name}>" for name in sections)
    return re.compile(rf"\s*{body}\s*", re.DOTALL)


_LLAVA_COT = _tagged(LLAVA_COT_SECTIONS)
_R1 = _tagged(R1_SECTIONS)
_LLAVA_COT_TAGS = re.compile("|".join(rf"</?{name}>" for name in LLAVA_COT_SECTIONS))
_R1_TAGS = re.compile("|".join(rf"</?{name}>" for name in R1_SECTIONS))


# ------------------------------------------------------------------ reading records back
def preference_fields(record: dict) -> dict[str, str]:
    """{prompt, chosen, rejected} of a sample's json: a converted preference sample, or a
    synthetic shapes record (its "preference"). BadSample("missing_<field>") when one is not
    a string."""
    return _fields(record.get("preference", record), PREFERENCE_FIELDS)


def cot_fields(record: dict) -> dict[str, str]:
    """{question, reasoning, answer} of a sample's json: a converted chain-of-thought sample,
    or a synthetic shapes record (its "cot"). BadSample("missing_<field>") as above."""
    return _fields(record.get("cot", record), COT_FIELDS)


def _fields(record, names: tuple[str, ...]) -> dict[str, str]:
    if not isinstance(record, dict):
        raise BadSample("bad_json")
    for name in names:
        if not isinstance(record.get(name), str):
            raise BadSample(f"missing_{name}")
    return {name: record[name] for name in names}


# ------------------------------------------------------------------ answer tags
def parse_llava_cot(text) -> dict[str, str]:
    """LLaVA-CoT's answer -> {"summary", "caption", "reasoning", "conclusion"} (stripped).
    BadSample("bad_tags") unless it is exactly the four tagged sections in order, each once and
    non-empty, with only whitespace around them."""
    return _parse(text, _LLAVA_COT, _LLAVA_COT_TAGS, [s.lower() for s in LLAVA_COT_SECTIONS])


def parse_r1(text) -> dict[str, str]:
    """An R1-format answer, <think>...</think><answer>...</answer> -> {"think", "answer"}
    (stripped); BadSample("bad_tags") as parse_llava_cot."""
    return _parse(text, _R1, _R1_TAGS, list(R1_SECTIONS))


def _parse(text, pattern: re.Pattern, tags: re.Pattern, names: list[str]) -> dict[str, str]:
    match = pattern.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise BadSample("bad_tags")
    parts = [part.strip() for part in match.groups()]
    # a lazy match can still swallow a stray or repeated tag into a section
    if not all(parts) or any(tags.search(part) for part in parts):
        raise BadSample("bad_tags")
    return dict(zip(names, parts))


def _cot_record(answer_text: str, tags: str) -> dict:
    """question-less CoT fields of one answer in `tags` format."""
    if tags == "llava_cot":
        parts = parse_llava_cot(answer_text)
        steps = {name: parts[name] for name in ("summary", "caption", "reasoning")}
        return {
            "reasoning": "\n\n".join(steps.values()),
            "answer": parts["conclusion"],
            "reasoning_parts": steps,
        }
    parts = parse_r1(answer_text)
    return {"reasoning": parts["think"], "answer": parts["answer"]}


def _clean_text(value, reason: str) -> str:
    """A prompt or response: stripped, without a leading or trailing image token.
    BadSample(reason) when empty, "image_token_in_text" when an image token is left inside."""
    if not isinstance(value, str):
        raise BadSample(reason)
    text = value.strip()
    while text.startswith(IMAGE_TOKEN):
        text = text[len(IMAGE_TOKEN) :].lstrip()
    while text.endswith(IMAGE_TOKEN):
        text = text[: -len(IMAGE_TOKEN)].rstrip()
    if IMAGE_TOKEN in text:
        raise BadSample("image_token_in_text")
    if not text:
        raise BadSample(reason)
    return text


# ------------------------------------------------------------------ images
def image_member(data) -> tuple[str, bytes]:
    """(extension, bytes) an image is stored as: its own bytes when they are jpg, png or webp,
    otherwise re-encoded as png (lossless). BadSample("missing_image") / ("bad_image")."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BadSample("missing_image")
    data = bytes(data)
    ext = image_extension(data)  # decodes it fully: BadSample("bad_image") when it does not
    if ext in KEPT_FORMATS:
        return ext, data
    buffer = io.BytesIO()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in PNG_MODES:  # CMYK, YCbCr, float, premultiplied alpha, ...
                alpha = any(band in ("A", "a") for band in image.getbands())
                image = image.convert("RGBA" if alpha else "RGB")
            image.save(buffer, format="PNG")
    except Exception:  # PIL raises many types for what it cannot convert
        raise BadSample("bad_image") from None
    return "png", buffer.getvalue()


def image_draw(data: bytes) -> float:
    """A number in [0, 1) fixed by the image's bytes: the sample goes to val when it is below
    the val fraction."""
    digest = hashlib.blake2b(data, digest_size=8, person=VAL_HASH_PERSON).digest()
    return int.from_bytes(digest, "big") / 2**64


# ------------------------------------------------------------------ RLAIF-V
def rlaif_v_sample(row: dict) -> tuple[bytes, dict]:
    """(image bytes, json record) of a row of RLAIF-V in either layout (module docstring);
    BadSample when unusable."""
    if "question" in row and "image" in row:  # openbmb/RLAIF-V-Dataset
        image = _image_bytes(row["image"])
        prompt, source = row["question"], RLAIF_V_REPO
        chosen, rejected = row.get("chosen"), row.get("rejected")
        metadata = {k: row[k] for k in RLAIF_V_METADATA if _is_plain(row.get(k))}
    elif "prompt" in row and "images" in row:  # HuggingFaceH4/rlaif-v_formatted
        images = row["images"]
        if not isinstance(images, list) or len(images) != 1:
            raise BadSample("image_count")
        image = _image_bytes(images[0])
        prompt = _message_text(row["prompt"], "user", images=1)
        chosen = _message_text(row.get("chosen"), "assistant", images=0)
        rejected = _message_text(row.get("rejected"), "assistant", images=0)
        source, metadata = RLAIF_V_FORMATTED_REPO, {}
    else:
        raise BadSample("unknown_layout")
    record = {
        "prompt": _clean_text(prompt, "empty_prompt"),
        "chosen": _clean_text(chosen, "empty_response"),
        "rejected": _clean_text(rejected, "empty_response"),
    }
    if record["chosen"] == record["rejected"]:
        raise BadSample("same_responses")  # no preference to learn: the margin is always 0
    return image, {**record, "source": source, "num_images": 1, **metadata}


def _image_bytes(image) -> bytes:
    """The bytes of a `datasets` Image cell ({"bytes", "path"}) or of raw bytes."""
    data = image.get("bytes") if isinstance(image, dict) else image
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BadSample("missing_image")
    return bytes(data)


def _message_text(messages, role: str, images: int) -> str:
    """The text of a one-message conversation of `role` whose content holds `images` image
    parts and text parts (joined by newlines); BadSample("bad_messages") otherwise."""
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict):
        raise BadSample("bad_messages")
    message = messages[0]
    content = message.get("content")
    if message.get("role") != role or not isinstance(content, list):
        raise BadSample("bad_messages")
    if not all(isinstance(part, dict) for part in content):
        raise BadSample("bad_messages")
    texts = [part.get("text") for part in content if part.get("type") == "text"]
    found = sum(part.get("type") == "image" for part in content)
    if found != images or found + len(texts) != len(content):
        raise BadSample("bad_messages")
    if not all(isinstance(text, str) for text in texts):
        raise BadSample("bad_messages")
    return "\n".join(texts)


def convert_rlaif_v(
    sources: Iterable[str | Path],
    out_dir: str | Path,
    *,
    val_fraction: float = 0.0,
    shard_size: int = 1000,
    max_samples: int | None = None,
) -> dict:
    """RLAIF-V parquet files (or directories of them, searched recursively) -> preference
    shards in `out_dir`. `max_samples` caps the rows read. Returns {"train", "val" (samples
    written), "rows" (read), "skipped": {reason: rows}}."""
    _check(val_fraction, shard_size)
    files = _files(sources, (".parquet",))
    rows = _capped(_parquet_rows(files), max_samples)
    read = Counter()

    def samples() -> Iterator[tuple[int, tuple[bytes, dict] | str]]:
        for index, row in enumerate(rows):
            _progress("rlaif-v", index)
            read["rows"] += 1
            try:
                yield index, rlaif_v_sample(row)
            except BadSample as bad:
                yield index, bad.reason

    result = _write(samples(), Path(out_dir), "rlaif_v", val_fraction, shard_size)
    return {**result, "rows": read["rows"]}


# ------------------------------------------------------------------ LLaVA-CoT
def llava_cot_turns(row: dict) -> tuple[str, list[tuple[str, str]], str]:
    """(image path, [(question, answer text)], the layout's dataset) of a row in the LLaVA-CoT
    layout or in llava-cot-100k-r1-format's; BadSample("no_image"), ("image_count"),
    ("bad_conversations"), ("unknown_layout")."""
    if "conversations" in row:
        image = row.get("image")
        if not isinstance(image, str) or not image:
            raise BadSample("no_image")  # the official training code skips these too
        return image, _pairs(row["conversations"]), LLAVA_COT_REPO
    if "problem" in row and "images" in row:
        images = row["images"]
        if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
            raise BadSample("image_count")
        return images[0], [(row["problem"], row.get("answer"))], LLAVA_COT_R1_REPO
    raise BadSample("unknown_layout")


def _pairs(conversations) -> list[tuple[str, str]]:
    """[(human value, gpt value)] of turns that alternate human, gpt."""
    if not isinstance(conversations, list) or not conversations or len(conversations) % 2:
        raise BadSample("bad_conversations")
    pairs = []
    for human, gpt in zip(conversations[::2], conversations[1::2]):
        if not (isinstance(human, dict) and isinstance(gpt, dict)):
            raise BadSample("bad_conversations")
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise BadSample("bad_conversations")
        pairs.append((human.get("value"), gpt.get("value")))
    return pairs


def convert_llava_cot(
    sources: Iterable[str | Path],
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    tags: str = "llava_cot",
    val_fraction: float = 0.0,
    shard_size: int = 1000,
    max_samples: int | None = None,
) -> dict:
    """LLaVA-CoT rows (.jsonl, a .json list, or .parquet; directories searched recursively) with
    their images under `images_dir` -> chain-of-thought shards in `out_dir`, one sample per
    question-answer turn, answers parsed as `tags` ("llava_cot" or "r1"). `max_samples` caps
    the rows read. Returns {"train", "val" (samples written), "rows", "turns" (read),
    "skipped": {reason: turns}}; a row that cannot be split into turns counts once."""
    if tags not in TAGS:
        raise ValueError(f"unknown tags {tags!r}; the formats are {', '.join(TAGS)}")
    _check(val_fraction, shard_size)
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"no image directory {images_dir}")
    files = _files(sources, (".jsonl", ".json", ".parquet"))
    rows = _capped(_json_rows(files), max_samples)
    read = Counter()

    def samples() -> Iterator[tuple[int, tuple[bytes, dict] | str]]:
        for row_index, row in enumerate(rows):
            _progress("llava-cot", row_index)
            read["rows"] += 1
            try:
                if isinstance(row, BadSample):
                    raise row
                image_path, pairs, source = llava_cot_turns(row)
            except BadSample as bad:
                read["turns"] += 1
                yield read["turns"] - 1, bad.reason
                continue
            metadata = {"source": source, "num_images": 1, "format": tags, "row": row_index}
            metadata.update(image_path=image_path)
            for name in ("id", "caption"):  # caption: llava-cot-100k-r1-format's column
                if isinstance(row.get(name), (str, int)):
                    metadata[name] = row[name]
            image = None  # read once per row, when a turn needs it
            for turn, (question, answer) in enumerate(pairs):
                read["turns"] += 1
                try:
                    record = {
                        "question": _clean_text(question, "empty_question"),
                        **_cot_record(answer, tags),
                    }
                    if image is None:
                        image = _read_image(images_dir, image_path)
                    yield read["turns"] - 1, (image, {**record, **metadata, "turn": turn})
                except BadSample as bad:
                    yield read["turns"] - 1, bad.reason

    stem = "llava_cot" if tags == "llava_cot" else "llava_cot_r1"
    result = _write(samples(), Path(out_dir), stem, val_fraction, shard_size)
    return {**result, "rows": read["rows"], "turns": read["turns"]}


def _read_image(images_dir: Path, relative: str) -> bytes:
    """The image file's bytes; BadSample("missing_image") when there is none."""
    path = images_dir / relative
    if not path.is_file():
        raise BadSample("missing_image")
    return path.read_bytes()


# ------------------------------------------------------------------ shared
def _check(val_fraction: float, shard_size: int) -> None:
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, not {shard_size}")


def _files(sources: Iterable[str | Path], suffixes: tuple[str, ...]) -> list[Path]:
    """The files named, and those under the directories named (sorted), with these suffixes."""
    files = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
            if not found:
                raise FileNotFoundError(f"no {' or '.join(suffixes)} files under {path}")
            files += found
        elif path.is_file():
            if path.suffix not in suffixes:
                raise ValueError(f"{path}: expected a {' or '.join(suffixes)} file")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither a file nor a directory")
    if not files:
        raise FileNotFoundError("no source files given")
    return files


def _parquet_rows(files: list[Path]) -> Iterator[dict]:
    """Rows as dicts (a `datasets` Image column as {"bytes", "path"}), batch by batch."""
    import pyarrow.parquet as pq

    for path in files:
        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH):
                yield from batch.to_pylist()


def _json_rows(files: list[Path]) -> Iterator[dict | BadSample]:
    """Rows of .jsonl (a line that is not a JSON object: BadSample("bad_json") in its place),
    .json (a list of rows) and .parquet files."""
    for path in files:
        if path.suffix == ".parquet":
            yield from _parquet_rows([path])
        elif path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise ValueError(f"{path}: expected a JSON list of rows")
            yield from (row if isinstance(row, dict) else BadSample("bad_json") for row in rows)
        else:
            with open(path, encoding="utf-8") as lines:
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None
                    yield row if isinstance(row, dict) else BadSample("bad_json")


def _capped(rows: Iterator, max_samples: int | None) -> Iterator:
    if max_samples is None:
        yield from rows
        return
    for index, row in enumerate(rows):
        if index == max_samples:
            return
        yield row


def _progress(name: str, index: int) -> None:
    if index and index % LOG_EVERY == 0:
        log.info("%s: %d rows read", name, index)


def _write(
    samples: Iterator[tuple[int, tuple[bytes, dict] | str]],
    out: Path,
    stem: str,
    val_fraction: float,
    shard_size: int,
) -> dict:
    """Write (index, (image bytes, record) or skip reason) samples as train / val shards;
    {"train", "val" (samples written), "skipped": {reason: count}}."""
    out.mkdir(parents=True, exist_ok=True)
    writers = {split: SplitWriter(out, stem, split, shard_size) for split in ("val", "train")}
    skipped: Counter = Counter()
    try:
        for index, sample in samples:
            try:
                if isinstance(sample, str):  # why the row or turn is skipped
                    raise BadSample(sample)
                image, record = sample
                ext, data = image_member(image)
            except BadSample as bad:
                skipped[bad.reason] += 1
                if sum(skipped.values()) <= LOG_SKIPPED:
                    log.warning("%s sample %d skipped: %s", stem, index, bad.reason)
                continue
            text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
            split = "val" if image_draw(image) < val_fraction else "train"
            writers[split].add(index, {ext: data, "json": text.encode()})
        sizes = writers["val"].close() | writers["train"].close()
    finally:
        for writer in writers.values():
            writer.abort()  # what an error left unfinished
    counts = finish_conversion(out, sizes, skipped, stem)
    return {**counts, "skipped": dict(sorted(skipped.items()))}


def _is_plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
