"""Chain-of-thought SFT samples (the staged VLM's stage 3): {images, question, reasoning, answer}
rendered in a configurable format and trained through the tokenizer's chat template.

Formats (`data.cot_format`), the assistant turn the model learns to write:

    think      <think>\\n{reasoning}\\n</think>\\n\\n{answer}
               (DeepSeek-R1's and Qwen3's layout: what Qwen3's template renders for a turn with
               reasoning)
    llava_cot  <SUMMARY> {summary} </SUMMARY>\\n\\n<CAPTION> {caption} </CAPTION>\\n\\n
               <REASONING> {reasoning} </REASONING>\\n\\n<CONCLUSION> {answer} </CONCLUSION>
               (LLaVA-CoT's four stages; the tags as its dataset generator asks for them)

Samples are the CoT shards of core/data/preference_sources.py (`vlscale shards llava-cot`; a
synthetic shapes record's "cot" reads the same): `llava_cot` needs the record's
"reasoning_parts" {summary, caption, reasoning} (a record without them is BadSample
"no_reasoning_parts"), `think` writes "reasoning" as it is (LLaVA-CoT's three parts joined).

Supervision. A CoT sample has one turn: [system], user (images + question), assistant (the
target T above). Its rendering must be the template's generation prompt for the same
conversation, then T verbatim, then the end-of-turn token: exactly what the model sees and must
write at inference. The labels are T's tokens and the end-of-turn token, nothing else (not the
system, user, image or role tokens, nor anything the generation prompt inserts, e.g. Qwen3's
empty `<think>` block with `enable_thinking: false`), and they decode to T + end-of-turn. A
template that rewrites the turn otherwise (Qwen3 with `enable_thinking: false` in the think
format: it renders the reasoning, but its generation prompt is an empty think block) cannot
train this format faithfully: `CoTProcessor` raises a ValueError naming the fix when it is
built, and a sample that a template rewrites for its text alone is BadSample
"template_rewrites_answer".

Label kinds (`label_kinds`, per token, packed like the labels): ANSWER for the supervised tokens
that overlap the answer text, and the end-of-turn token (the model learns to stop once it has
answered); REASONING for the others: the reasoning and every tag (`</think>`, `<CONCLUSION>` and
`</CONCLUSION>` included); NO_KIND for the unsupervised ones. The task logs each kind's mean loss.

Evaluation (`parse_output`): an output complies with the format when its tags are closed, in
order, each once, with non-empty sections and nothing else around them; the answer is then the
text after `</think>`, or the `<CONCLUSION>` section.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from core.data.chat import (
    IGNORE,
    IMAGE_MEMBER,
    ChatProcessor,
    VLMDecoder,
    json_member,
)
from core.data.errors import BadSample
from core.data.preference_sources import cot_fields, parse_llava_cot

COT_FORMATS = ("think", "llava_cot")
NO_KIND, REASONING, ANSWER = -1, 0, 1
LLAVA_COT_PARTS = ("summary", "caption", "reasoning")
# Every tag of each format: a text holding one would make the target ambiguous to parse.
FORMAT_TAGS = {
    "think": re.compile(r"</?think>"),
    "llava_cot": re.compile(r"</?(SUMMARY|CAPTION|REASONING|CONCLUSION)>"),
}
_THINK = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)
SINGLE_IMAGE_KEYS = ("jpg", "png", "webp")  # the CoT shards' `{key}.{ext}` image member
# A sample the processor checks itself with when it is built.
PROBE = {
    "question": "What is shown?",
    "reasoning": "Step one.\n\nStep two.",
    "answer": "A cat.",
    "reasoning_parts": {"summary": "I will look.", "caption": "A cat.", "reasoning": "So."},
}


@dataclass(frozen=True)
class Target:
    """The assistant turn of a CoT sample and its answer text's characters, text[start:end]."""

    text: str
    answer_start: int
    answer_end: int


def render_target(fmt: str, record: dict) -> Target:
    """The assistant turn in format `fmt` of a CoT record ({question, reasoning, answer} and, for
    llava_cot, "reasoning_parts"), every text stripped. BadSample: missing_<field>,
    empty_reasoning, empty_answer, no_reasoning_parts, tag_in_text (a text holding one of the
    format's tags)."""
    if fmt not in COT_FORMATS:
        raise ValueError(f"unknown CoT format {fmt!r}; the formats are {', '.join(COT_FORMATS)}")
    fields = cot_fields(record)
    reasoning, answer = fields["reasoning"].strip(), fields["answer"].strip()
    if not reasoning:
        raise BadSample("empty_reasoning")
    if not answer:
        raise BadSample("empty_answer")
    if fmt == "think":
        texts = [reasoning, answer]
        head = f"<think>\n{reasoning}\n</think>\n\n"
        tail = ""
    else:
        parts = record.get("cot", record).get("reasoning_parts")
        if not isinstance(parts, dict) or not all(
            isinstance(parts.get(name), str) and parts[name].strip() for name in LLAVA_COT_PARTS
        ):
            raise BadSample("no_reasoning_parts")
        summary, caption, steps = (parts[name].strip() for name in LLAVA_COT_PARTS)
        texts = [summary, caption, steps, answer]
        head = (
            f"<SUMMARY> {summary} </SUMMARY>\n\n<CAPTION> {caption} </CAPTION>\n\n"
            f"<REASONING> {steps} </REASONING>\n\n<CONCLUSION> "
        )
        tail = " </CONCLUSION>"
    if any(FORMAT_TAGS[fmt].search(text) for text in texts):
        raise BadSample("tag_in_text")
    return Target(head + answer + tail, len(head), len(head) + len(answer))


def parse_output(fmt: str, text: str) -> str | None:
    """The answer of a generated output in format `fmt`, or None when the output does not comply:
    tags missing, unclosed, out of order or repeated, an empty section, or text outside them."""
    if fmt == "llava_cot":
        try:
            return parse_llava_cot(text)["conclusion"]
        except BadSample:
            return None
    if fmt != "think":
        raise ValueError(f"unknown CoT format {fmt!r}; the formats are {', '.join(COT_FORMATS)}")
    match = _THINK.fullmatch(text)
    if match is None:
        return None
    reasoning, answer = match.group(1).strip(), match.group(2).strip()
    if not reasoning or not answer or FORMAT_TAGS["think"].search(reasoning + answer):
        return None
    return answer


class CoTProcessor:
    """Ids, labels and label kinds of CoT samples, rendered with `processor`'s chat template,
    system prompt, template arguments and image block (see the module docstring for the rule).
    ValueError when the template cannot render the format faithfully."""

    def __init__(self, processor: ChatProcessor, fmt: str):
        if fmt not in COT_FORMATS:
            raise ValueError(
                f"unknown CoT format {fmt!r}; the formats are {', '.join(COT_FORMATS)}"
            )
        self.processor = processor
        self.chat = processor.chat
        self.tokenizer = processor.tokenizer
        self.format = fmt
        self.end_of_turn_id = processor.end_of_turn_id
        self._check_template()

    def prompt(self, question: str, num_images: int) -> list[int]:
        """Ids for generating the answer: the question's turn and the generation prompt."""
        return self.processor.prompt([{"user": question, "assistant": ""}], num_images)

    def encode(self, record: dict, num_images: int) -> tuple[list[int], list[int], list[int]]:
        """(input_ids, labels, label_kinds) of a CoT record. BadSample as `render_target`, and
        empty_question, special_token_in_text, template_rewrites_answer."""
        target = render_target(self.format, record)
        question = cot_fields(record)["question"]
        if not question.strip():
            raise BadSample("empty_question")
        if self._outside_tags(target.text):  # the question is checked as every user text is
            raise BadSample("special_token_in_text")
        text, start = self._render(question, target, num_images)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        first = next((j for j, (s, _) in enumerate(offsets) if s >= start), len(ids))
        if first and offsets[first - 1][1] > start:  # a token spans the prompt and the answer
            raise BadSample("template_rewrites_answer")
        end = start + len(target.text)
        last = next((j for j in range(first, len(ids)) if offsets[j][0] >= end), len(ids))
        if last == len(ids) or ids[last] != self.end_of_turn_id or offsets[last][0] != end:
            raise BadSample("template_rewrites_answer")
        answer_from, answer_to = start + target.answer_start, start + target.answer_end
        labels, kinds = [IGNORE] * len(ids), [NO_KIND] * len(ids)
        for j in range(first, last + 1):
            labels[j] = ids[j]
            # a token overlapping the answer text is the answer's (" red" after "<CONCLUSION>")
            in_answer = offsets[j][0] < answer_to and offsets[j][1] > answer_from
            kinds[j] = ANSWER if in_answer or j == last else REASONING
        return ids, labels, kinds

    # ------------------------------------------------------------------ rendering
    def _render(self, question: str, target: Target, num_images: int) -> tuple[str, int]:
        """The conversation's rendering and where the target starts in it; BadSample
        ("template_rewrites_answer") unless it is prompt + target + end-of-turn token + rest."""
        messages = self.processor.messages(
            [{"user": question, "assistant": ""}], num_images, prompt=True
        )
        prompt = self.chat.render(messages, generation_prompt=True)
        text = self.chat.render(messages + [{"role": "assistant", "content": target.text}])
        expected = prompt + target.text + self.processor.end_of_turn
        if not text.startswith(expected):
            raise BadSample("template_rewrites_answer")
        return text, len(prompt)

    def _outside_tags(self, text: str) -> bool:
        """Whether `text` holds an added token of the tokenizer other than the format's own tags
        (Qwen3's `<think>` and `</think>` are added tokens: the format writes them)."""
        try:
            self.chat.check_text(FORMAT_TAGS[self.format].sub("", text))
        except BadSample:
            return True
        return False

    def _check_template(self) -> None:
        """Render PROBE; ValueError saying why the template cannot train this format."""
        target = render_target(self.format, PROBE)
        messages = self.processor.messages(
            [{"user": PROBE["question"], "assistant": ""}], 1, prompt=True
        )
        prompt = self.chat.render(messages, generation_prompt=True)
        text = self.chat.render(messages + [{"role": "assistant", "content": target.text}])
        if not text.startswith(prompt):
            raise ValueError(
                f"the chat template cannot train data.cot_format={self.format}: its generation "
                f"prompt ends {prompt[-40:]!r}, but it renders the assistant turn as "
                f"{text[len(_common_prefix(prompt, text)) - 20:][:120]!r}, so the model would be "
                "trained on a turn it is never prompted for"
                + ("; with Qwen3's template set data.chat_template_kwargs: {enable_thinking: "
                   "true} (its generation prompt is then the bare assistant header)"
                   if "<think>" in prompt[-40:] else "")
            )  # fmt: skip
        rest = text[len(prompt) :]
        if not rest.startswith(target.text + self.processor.end_of_turn):
            raise ValueError(
                f"the chat template cannot train data.cot_format={self.format}: after its "
                f"generation prompt it writes {rest[:160]!r} instead of the target "
                f"{target.text[:80]!r}... then {self.processor.end_of_turn!r} (it rewrites or "
                "surrounds the reasoning)"
                + ("; with Qwen3's template and the llava_cot format keep "
                   "enable_thinking: false" if rest.startswith("<think>") else "")
            )  # fmt: skip
        try:
            ids, _, _ = self.encode(PROBE, 1)
        except BadSample as bad:
            raise ValueError(
                f"the chat template cannot train data.cot_format={self.format}: {bad.reason}"
            ) from None
        prompt_ids = self.prompt(PROBE["question"], 1)
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                f"data.cot_format={self.format}: the tokenizer splits the generation prompt "
                "differently when the answer follows it, so training and generation would see "
                "different prompt tokens"
            )


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def cot_images(sample: dict) -> list[bytes]:
    """A CoT sample's image bytes: numbered members ("0.jpg", ...), else its one `{key}.{ext}`
    member (the CoT shards' and the synthetic shapes shards' layout)."""
    numbered = {}
    for name, data in sample.items():
        match = IMAGE_MEMBER.match(name)
        if match:
            numbered[int(match.group(1))] = data
    if numbered:
        if sorted(numbered) != list(range(len(numbered))):
            raise BadSample("image_count_mismatch")
        return [numbered[i] for i in range(len(numbered))]
    return [sample[key] for key in SINGLE_IMAGE_KEYS if key in sample][:1]


class _CoTDecoder(VLMDecoder):
    def __init__(self, cot: CoTProcessor, image_size: int, mean, std, max_images: int = 8,
                 max_pixels: int = 64_000_000):  # fmt: skip
        super().__init__(cot.processor, image_size, mean, std, max_images, max_pixels)
        self.cot = cot

    def _read(self, sample: dict) -> tuple[dict, list[dict], list[bytes]]:
        record = read_cot_record(sample)
        images = cot_images(sample)
        declared = record.get("num_images", len(images))
        if declared != len(images):
            raise BadSample("image_count_mismatch")
        if len(images) > self.max_images:
            raise BadSample("too_many_images")
        return record, [], images


def read_cot_record(sample: dict) -> dict:
    """The sample's json member. Unlike FineVision's, its `num_images` is optional (a synthetic
    shapes record has none); when present it must be an int."""
    record = json_member(sample)
    if "num_images" in record and not isinstance(record["num_images"], int):
        raise BadSample("bad_json")
    return record


class CoTTrainDecoder(_CoTDecoder):
    """Raw CoT sample -> {"pixel_values" [n, 3, S, S], "input_ids", "labels", "label_kinds"
    (int64 [T])}. A sample longer than `max_seq_len` tokens is BadSample("too_long"): never
    truncated (a cut-off chain of thought would teach the model to stop mid-reasoning, or to
    answer without one), skipped and counted like every other unusable sample."""

    def __init__(self, cot: CoTProcessor, image_size: int, mean, std, max_seq_len: int,
                 max_images: int = 8, max_pixels: int = 64_000_000):  # fmt: skip
        super().__init__(cot, image_size, mean, std, max_images, max_pixels)
        self.max_seq_len = max_seq_len

    def __call__(self, sample: dict) -> dict:
        record, _, images = self._read(sample)
        ids, labels, kinds = self.cot.encode(record, len(images))
        if len(ids) > self.max_seq_len:
            raise BadSample("too_long")
        return {
            "pixel_values": self._pixels(images),
            "input_ids": torch.tensor(ids, dtype=torch.int64),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "label_kinds": torch.tensor(kinds, dtype=torch.int64),
        }


class CoTEvalDecoder(_CoTDecoder):
    """Raw CoT sample -> {"pixel_values", "prompt_ids" (the question's turn and the generation
    prompt), "answer" (the reference answer, without reasoning), "answers": [answer], "source",
    "key"}; BadSample as CoTTrainDecoder's reading and rendering (a sample it would not train on
    is not asked either)."""

    def __call__(self, sample: dict) -> dict:
        record, _, images = self._read(sample)
        render_target(self.cot.format, record)  # the same checks as training's
        fields = cot_fields(record)
        question, answer = fields["question"], fields["answer"].strip()
        if not question.strip():
            raise BadSample("empty_question")
        source = record.get("source")
        return {
            "pixel_values": self._pixels(images),
            "prompt_ids": torch.tensor(self.cot.prompt(question, len(images)), dtype=torch.int64),
            "answer": answer,
            "answers": [answer],
            "source": source if isinstance(source, str) else "",
            "key": sample["__key__"],
        }
