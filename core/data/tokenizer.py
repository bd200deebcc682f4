"""A small byte-level BPE tokenizer, saved in Hugging Face format.

`transformers.AutoTokenizer.from_pretrained(out_dir)` loads it as a PreTrainedTokenizerFast,
the same path real runs take with e.g. Qwen/Qwen3-0.6B's tokenizer. Like Qwen's, it adds no
BOS/EOS when encoding; the caption decoder appends EOS itself.

`train_vlm_tokenizer` makes one for the staged VLM: Qwen2.5's chat and vision special tokens
(each a single token, looked up by string as in Qwen/Qwen2.5-0.5B-Instruct) and a chat template
that renders conversations the way Qwen2-VL's does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

# Qwen2.5's specials that the VLM chat format uses (Qwen2.5-Instruct: pad <|endoftext|>, eos
# <|im_end|>, no bos).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
QWEN_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Renders like Qwen2-VL's template, except that a conversation without a system message gets no
# system turn (Qwen2-VL's adds a default one: the tiny demo trains without, a tiny LM gains nothing
# from 8 more tokens a sample); one <|vision_start|><|image_pad|><|vision_end|> per image part (the
# model's processor repeats the pad once per image token), text parts verbatim. No newline
# follows a block tag: transformers renders with trim_blocks, which would drop it.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1024,
    special_tokens: Sequence[str] = (),
    *,
    pad_token: str | None = PAD,
    bos_token: str | None = BOS,
    eos_token: str | None = EOS,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train on `texts`, save to `out_dir` and return the tokenizer.

    The pad, bos and eos tokens (by default <pad> 0, <bos> 1, <eos> 2; None leaves one out)
    come first, then `special_tokens`: each is one token, never split or merged, and skipped
    by `decode(..., skip_special_tokens=True)`. `chat_template` is saved with the tokenizer.
    """
    named = [t for t in (pad_token, bos_token, eos_token) if t is not None]
    specials = list(dict.fromkeys([*named, *special_tokens]))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text stays encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    extra = [t for t in specials if t not in named]
    kwargs = {"extra_special_tokens": extra} if extra else {}
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=pad_token,
        bos_token=bos_token,
        eos_token=eos_token,
        **kwargs,
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def train_vlm_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """A BPE tokenizer with Qwen2.5's specials (pad <|endoftext|>, eos <|im_end|>, no bos) and
    a Qwen2-VL-style chat template, trained on `texts` plus the chat format's own words."""
    boilerplate = ["system\n" + DEFAULT_SYSTEM_PROMPT, "user\n", "assistant\n", "\n"]
    return train_bpe_tokenizer(
        itertools.chain(boilerplate, texts),
        out_dir,
        vocab_size,
        QWEN_SPECIAL_TOKENS,
        pad_token=ENDOFTEXT,
        bos_token=None,
        eos_token=IM_END,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
