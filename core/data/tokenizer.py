"""A small byte-level BPE tokenizer, saved in Hugging Face format.

`transformers.AutoTokenizer.from_pretrained(out_dir)` loads it as a PreTrainedTokenizerFast,
the same path real runs take with e.g. Qwen/Qwen3-0.6B's tokenizer. Like Qwen's, it adds no
BOS/EOS when encoding; the caption decoder appends EOS itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def train_bpe_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train on `texts`, save to `out_dir` and return the tokenizer (pad id 0, bos 1, eos 2)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text stays encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )
    wrapped.save_pretrained(str(out_dir))
    return wrapped
