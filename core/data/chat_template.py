"""Conversations rendered with the tokenizer's own chat template, and which tokens are supervised.

A template works when it writes each (stripped) assistant content verbatim and an added token
after it (tested: Qwen2.5, Qwen3, Llama 3, Llama 3.2, SmolLM2, Gemma 2; other templates are
errors that say which of the two fails). A tokenizer without a template renders ChatML (`CHATML`,
vlscale's format before templates were read).

Supervised tokens, one rule for every template: each assistant turn's content and every token
the template writes after it up to and including the first of the tokenizer's added tokens
there, the end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`; the model learns to
stop, and generation stops at it). Nothing else the template writes is: not the role header, not
Qwen3's empty `<think>` block, not the newline after the end-of-turn token.

How the contents are found. The conversation is rendered twice: as it is, and with every
assistant content replaced by a sentinel. The sentinel rendering splits into the template's own
text around each content (A0 S0 A1 S1 ... An); the real rendering must be exactly A0 c0 A1 c1 ...
An, which gives each content's characters (a template that rewrites contents otherwise, e.g.
Qwen3 splitting an answer that contains `</think>`, makes the sample a BadSample). Contents are
stripped of surrounding whitespace first, as the Llama and Gemma templates do themselves, so
every template writes them verbatim. The rendered string is then tokenised once (no boundary
artefacts: the ids are `apply_chat_template(..., tokenize=True)`'s), and a token is supervised
when its characters overlap a content, or lie between it and its end-of-turn token.

Template-specific consequences, all from the one rule: Llama 3's `<|eot_id|>` is followed directly
by the next header, ChatML's `<|im_end|>` and Gemma's `<end_of_turn>` by a newline that is not
supervised. Qwen3 renders assistant turns before the last user message without a `<think>` block
and the last one with `<think>\\n\\n</think>\\n\\n` first; with `enable_thinking: false` (vlscale's
default template argument) its generation prompt ends with that block, so the last turn is
trained exactly as it is generated.
"""

from __future__ import annotations

import json
import re

from core.data.errors import BadSample

IGNORE = -100

# The format a tokenizer without a chat template gets: Qwen2.5's ChatML without a default system
# turn (the processor adds data.system_prompt itself).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Private-use characters: no template trims or splits on them, and no tokenizer sees them.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


def default_template(tokenizer) -> str:
    """The tokenizer's default chat template (a dict of named ones: "default"), else CHATML."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return template or CHATML


class ChatTemplate:
    """Render conversations (lists of {"role", "content": str} messages) with `template` and the
    template arguments `kwargs` (e.g. {"enable_thinking": False}); `encode` gives ids and labels by
    the module's rule. ValueError when the tokenizer cannot give character offsets (a slow one) or
    the template writes no added token after an assistant message (no end-of-turn token)."""

    def __init__(self, tokenizer, template: str | None = None, kwargs: dict | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "the chat processor needs a fast tokenizer (character offsets); "
                f"got {type(tokenizer).__name__}"
            )
        self.tokenizer = tokenizer
        self.template = template or default_template(tokenizer)
        self.kwargs = dict(kwargs or {})
        self._added = {token: i for token, i in tokenizer.added_tokens_encoder.items()}
        # Whitespace-only added tokens (Gemma's "\n" runs) are ordinary text in any message.
        texts = sorted((t for t in self._added if t.strip()), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, texts)) or "(?!)")
        self.end_of_turn_id = self._find_end_of_turn()
        self.end_of_turn = tokenizer.convert_ids_to_tokens(self.end_of_turn_id)

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False,
            add_generation_prompt=generation_prompt, **self.kwargs,
        )  # fmt: skip

    def check_text(self, text: str) -> None:
        """BadSample("special_token_in_text") when `text` holds one of the tokenizer's added
        tokens (it would tokenise as the token and could end a turn or fake an image)."""
        if self._special_re.search(text) or "\ue000" in text:
            raise BadSample("special_token_in_text")

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of the whole rendered conversation (see the module docstring)."""
        text, spans = self._render_with_spans(messages)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        labels = [IGNORE] * len(ids)
        j = 0
        for index, (start, end) in enumerate(spans):
            if start < end:  # the first token overlapping the content
                while j < len(ids) and offsets[j][1] <= start:
                    j += 1
            else:  # an empty answer: its end-of-turn token alone
                while j < len(ids) and offsets[j][0] < start:
                    j += 1
            limit = spans[index + 1][0] if index + 1 < len(spans) else len(text)
            while j < len(ids) and offsets[j][0] < limit:
                labels[j] = ids[j]
                j += 1
                if ids[j - 1] == self.end_of_turn_id and offsets[j - 1][0] >= end:
                    break
            else:
                raise BadSample("no_end_of_turn")
        return ids, labels

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Ids of `messages` (ending with a user turn) + the template's generation prompt."""
        text = self.render(messages, generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendering and the character span of each assistant content in it."""
        contents, marked = [], []
        for message in messages:
            if message["role"] == "assistant":
                marked.append({**message, "content": _SENTINEL.format(len(contents))})
                contents.append(message["content"])
            else:
                marked.append(message)
        text, skeleton = self.render(messages), self.render(marked)
        pieces = _SENTINEL_RE.split(skeleton)  # [A0, "0", A1, "1", ..., An]
        if pieces[1::2] != [str(k) for k in range(len(contents))]:
            raise BadSample("template_rewrites_answer")  # a content dropped or repeated
        spans, rebuilt = [], pieces[0]
        for content, after in zip(contents, pieces[2::2]):
            spans.append((len(rebuilt), len(rebuilt) + len(content)))
            rebuilt += content + after
        if rebuilt != text:
            raise BadSample("template_rewrites_answer")
        return text, spans

    def _find_end_of_turn(self) -> int:
        """The first added token the template writes after an assistant's content."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            text, [(_, end)] = self._render_with_spans(probe)
        except BadSample:
            raise ValueError("the chat template rewrites assistant messages") from None
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        added = set(self._added.values())
        for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            if start >= end and token in added:
                return token
        raise ValueError(
            "the chat template writes no special token after an assistant message, so there is "
            f"no end-of-turn token to learn and stop at (it renders {text!r})"
        )

    def export_template(self, system_prompt: str | None, image_block: str) -> str:
        """A chat template that renders what the processor trains on when used by anyone with
        `apply_chat_template`: this template, after a prelude that adds the system prompt (unless
        the conversation has one), writes each message's image parts as `image_block` before its
        text, strips the texts, and sets the template arguments that are not passed."""
        literal = _jinja_literal
        prelude = ["{%- set vlscale = namespace(messages=[]) -%}"]
        for name, value in self.kwargs.items():
            prelude.append(
                f"{{%- if {name} is not defined %}}{{%- set {name} = {literal(value)} %}}"
                "{%- endif -%}"
            )
        if system_prompt is not None:
            prelude.append(
                "{%- if not messages or messages[0]['role'] != 'system' -%}"
                "{%- set vlscale.messages = [{'role': 'system', 'content': "
                f"{literal(system_prompt.strip())}}}] -%}}"
                "{%- endif -%}"
            )
        prelude.append(
            "{%- for message in messages -%}"
            "{%- if message['content'] is string -%}"
            "{%- set content = message['content'] | trim -%}"
            "{%- else -%}"
            "{%- set parts = namespace(images='', text='') -%}"
            "{%- for part in message['content'] -%}"
            f"{{%- if part['type'] == 'image' %}}{{%- set parts.images = parts.images + "
            f"{literal(image_block)} %}}"
            "{%- elif part['type'] == 'text' %}{%- set parts.text = parts.text + part['text'] %}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- set content = parts.images + (parts.text | trim) -%}"
            "{%- endif -%}"
            "{%- set vlscale.messages = vlscale.messages + "
            "[{'role': message['role'], 'content': content}] -%}"
            "{%- endfor -%}"
            "{%- set messages = vlscale.messages -%}"
        )
        return "".join(prelude) + self.template


def _jinja_literal(value) -> str:
    """A Jinja expression for a str / bool / int / float (braces and quotes in a string stay
    text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value, ensure_ascii=False)
    raise ValueError(f"chat template arguments must be str, bool, int or float, got {value!r}")
