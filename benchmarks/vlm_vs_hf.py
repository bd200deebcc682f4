"""VLM training throughput: vlscale (own model + packing) vs the SiQ-VL stack (transformers).

    python benchmarks/vlm_vs_hf.py [--steps 8 --batch-size 16 --max-seq-len 2048 --threads 1
                                    --profile | --packing-only | --attention-only]

One tiny configuration, the same initial weights and the same samples in the same order on both
sides, SiQ-VL's stage 2 (vision tower frozen; projector and LM trained), fp32, CPU, one torch
thread by default (`--threads`):

  SigLIP vision 64 px / patch 8 (8x8 = 64 patches), width 128, 4 layers, no pooling head
  -> pixel shuffle 2 (16 tokens per image) -> linear projector 512 -> 256
  -> Qwen2 LM width 256, 4 layers, 4 query / 2 KV heads, MLP 1024, tied embeddings,
     vocabulary 8192 (`--vocab`)

Both towers are built by transformers from these configs and saved; vlscale loads the saved
checkpoints (model.vision / model.text), and the projector's initial weights are copied.

vlscale: `VLMTask` (logits only at supervised positions) + its `PackedCollate`
(`balanced_rows`: first-fit-decreasing's number of rows of `--max-seq-len`, balanced so the
longest row is as short as possible) + `train_step` with the ddp engine.
SiQ-VL stack: `SiglipVisionModel` + `nn.Linear` projector after the same pixel shuffle +
`Qwen2ForCausalLM` (SDPA attention), glued as SiQ-VL's `SiQ_VLForCausalLM.forward` does it
(vision under no_grad, image features written into the image-pad positions of the input
embeddings, the LM's own loss on labels -100 elsewhere), trained by `transformers.Trainer` with a
collator that pads each batch to its longest sample. Both take `--batch-size` samples per
optimizer step; same AdamW settings, clipping and cosine schedule.

Data: shard samples in FineVision's layout (json `texts` turns + PNG images), decoded by the
VLM task's own `VLMTrainDecoder` / `ChatProcessor` (Qwen2.5 ChatML with the default system
prompt; labels on each answer and its `<|im_end|>`), with a FineVision-like spread of lengths
(short VQA answers next to long captions and multi-turn): total tokens log-normal (median 160,
sigma 0.9) clipped to [40, 1000]; 0 / 1 / 2 images with probabilities 0.10 / 0.75 / 0.15; 1 / 2 /
3 turns with 0.60 / 0.25 / 0.15. The tokenizer is word-level (one token per word) with Qwen2.5's
special tokens, so lengths are exact.

Timing is interleaved step by step in one process: the Trainer runs its normal loop, and a
callback runs one vlscale step (on the same samples) at each of its `on_step_end`s. The Trainer's
time for a step is the wall time between two callbacks (data loading, collation, forward,
backward, clipping, optimizer and scheduler: everything its loop does); vlscale's includes its
packing. Machine noise hits both alike. Throughput is supervised tokens (next-token targets whose
label is not -100, the same count on both sides) per wall second over the steps after
`--warmup`. `--profile` then splits one forward + backward of each side by kind of op.

`--packing-only` trains nothing: it packs the same batches first-fit-decreasing and balanced and
prints, side by side, the packing efficiency (real tokens / (rows x width)) of each, with the
best any packing into rows of equal width could reach. `--attention-only` times the packed
attention of a typical batch (see `attention_report`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from core.data.packing import IGNORE, ROW_MULTIPLE, balanced_rows, first_fit_decreasing
from core.data.tokenizer import DEFAULT_SYSTEM_PROMPT, ENDOFTEXT, IM_END, QWEN_SPECIAL_TOKENS
from core.distributed import init_distributed
from core.engines import build_engine
from core.loop import seed_everything, train_step
from core.recipe import config_from_dict
from core.tasks import build_task
from core.tasks.vlm import VLMTask

SPECIALS = [*QWEN_SPECIAL_TOKENS, "<unk>"]
CHAT_WORDS = ["system", "user", "assistant", "\n", *DEFAULT_SYSTEM_PROMPT.split()]
LENGTH_MEDIAN, LENGTH_SIGMA, MIN_LEN, MAX_LEN = 160, 0.9, 40, 1000
IMAGES_P = [0.10, 0.75, 0.15]  # 0, 1, 2 images
TURNS_P = [0.60, 0.25, 0.15]  # 1, 2, 3 turns


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=16, help="samples per optimizer step")
    # 2048, not 1024: a batch holding a ~1000-token sample packs into rows of 1024 at 86% at
    # best, into rows of 2048 at 99-100%; attending per sample, wider rows cost nothing more
    p.add_argument("--max-seq-len", type=int, default=2048, help="vlscale's packed row length")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default). 1: on a shared machine two threads per\n"
        "process stall on each other whenever another process takes a core",
    )
    p.add_argument("--profile", action="store_true", help="then profile one step of each side")
    only = p.add_mutually_exclusive_group()
    only.add_argument(
        "--packing-only",
        action="store_true",
        help="no training: packing efficiency of the batches, first-fit-decreasing vs balanced",
    )
    only.add_argument(
        "--attention-only",
        action="store_true",
        help="no training: packed attention, dense mask vs per segment",
    )
    return p.parse_args()


# ------------------------------------------------------------------------------------ setup


def write_tokenizer(out: Path, vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` entries with Qwen2.5's specials: every
    space-separated word and every newline is one token, so sample lengths are exact."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    words = SPECIALS + CHAT_WORDS
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
            pre_tokenizers.Split("\n", "isolated"),
        ]
    )
    tok.add_special_tokens(SPECIALS)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=ENDOFTEXT, eos_token=IM_END, unk_token="<unk>"
    )
    wrapped.save_pretrained(str(out))
    assert len(wrapped) == vocab_size, len(wrapped)
    return wrapped


def write_hf_towers(root: Path, args) -> tuple[Path, Path]:
    """Random SigLIP vision tower and Qwen2 LM, saved in Hugging Face layout."""
    vision = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(
            image_size=64,
            patch_size=8,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            vision_use_head=False,
        )
    )
    lm = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=args.vocab,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=MAX_LEN + 24,
            tie_word_embeddings=True,
            use_cache=False,
        )
    )
    vision.save_pretrained(root / "vision")
    lm.save_pretrained(root / "lm")
    return root / "vision", root / "lm"


def build_ours(root: Path, args) -> tuple[VLMTask, object]:
    cfg = config_from_dict(
        {
            "run_dir": str(root / "run"),
            "seed": args.seed,
            "model": {
                "vision": str(root / "vision"),
                "text": str(root / "lm"),
                "tokenizer": str(root / "tokenizer"),
            },
            "task": {
                "kind": "vlm",
                "stage": "sft",
                "lm_tuning": "full",
                "projector": {"kind": "linear", "pixel_shuffle": 2},
            },  # fmt: skip
            "data": {"batch_size": args.batch_size, "max_seq_len": args.max_seq_len},
            "optim": {
                "lr": args.lr,
                "weight_decay": 0.0,
                "warmup_steps": 0,
                "max_steps": args.warmup + args.steps,
                "grad_clip": 1.0,
            },
            "engine": {"kind": "ddp", "precision": "fp32"},
            "logging": {"wandb": {"mode": "disabled"}},
        }
    )
    return build_task(cfg), cfg


class SiQVLStyle(nn.Module):
    """SiglipVisionModel -> pixel shuffle -> nn.Linear -> Qwen2ForCausalLM, as SiQ-VL's
    `SiQ_VLForCausalLM.forward`: frozen vision under no_grad, image features written into the
    image-pad positions of the token embeddings, the LM's own loss (labels -100 elsewhere)."""

    def __init__(self, vision, lm, factor: int, image_token_id: int):
        super().__init__()
        self.vision, self.lm = vision, lm
        self.factor, self.image_token_id = factor, image_token_id
        d_in = vision.config.hidden_size * factor * factor
        self.projector = nn.Linear(d_in, lm.config.hidden_size)
        self.vision.requires_grad_(False)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        n, seq, dim = x.shape
        side, r = math.isqrt(seq), self.factor
        x = x.reshape(n, side // r, r, side // r, r, dim).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, (side // r) ** 2, dim * r * r)

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, **kwargs):
        embeds = self.lm.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            with torch.no_grad():
                features = self.vision(pixel_values).last_hidden_state
            images = self.projector(self.pixel_shuffle(features))
            where = (input_ids == self.image_token_id).nonzero(as_tuple=True)
            embeds[where] = images.reshape(-1, images.shape[-1]).to(embeds.dtype)
        return self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            labels=labels,
            use_cache=False,
            **kwargs,
        )


def build_theirs(root: Path, ours: VLMTask) -> SiQVLStyle:
    vision = transformers.SiglipVisionModel.from_pretrained(
        root / "vision", attn_implementation="sdpa"
    )
    lm = transformers.Qwen2ForCausalLM.from_pretrained(root / "lm", attn_implementation="sdpa")
    model = SiQVLStyle(vision, lm, ours.projector.factor, ours.image_token_id)
    model.projector.load_state_dict(ours.projector.proj.state_dict())  # same initial weights
    return model.train()


# ------------------------------------------------------------------------------------- data


def make_raw_samples(n: int, args, processor, image_size: int) -> list[dict]:
    """Shard samples in FineVision's layout ({"json": {"texts": [{"user", "assistant"}, ...],
    "num_images"}, "0.png", ...}) with FineVision-like lengths (see the module docstring): the
    total token count under `processor` is drawn first, then the turns and words to fill it."""
    rng = np.random.default_rng(args.seed)
    longest = min(MAX_LEN, args.max_seq_len)
    first_word = len(SPECIALS) + len(CHAT_WORDS)
    words = lambda k: " ".join(f"w{i}" for i in rng.integers(0, args.vocab - first_word, k))

    def fixed(turns: int, images: int) -> int:  # tokens of a conversation with empty texts
        return len(processor.encode([{"user": "", "assistant": ""}] * turns, images)[0])

    raws = []
    for index in range(n):
        length = int(
            np.clip(rng.lognormal(math.log(LENGTH_MEDIAN), LENGTH_SIGMA), MIN_LEN, longest)
        )
        images = int(rng.choice(3, p=IMAGES_P))
        turns = int(rng.choice(3, p=TURNS_P)) + 1
        while turns > 1 and fixed(turns, images) + 2 * turns > length:
            turns -= 1
        length = max(length, fixed(turns, images) + 2)
        # The words over the turns (>= 2 each), then each turn's between question and answer.
        budget = length - fixed(turns, images)
        per_turn = 2 + rng.multinomial(budget - 2 * turns, rng.dirichlet(np.ones(turns)))
        texts = []
        for turn_words in per_turn:
            answer = int(np.clip(round(turn_words * rng.beta(2, 2)), 1, turn_words - 1))
            texts.append({"user": words(turn_words - answer), "assistant": words(answer)})
        raw = {
            "__key__": f"{index:06d}",
            "json": json.dumps(
                {"texts": texts, "num_images": images, "source": "synthetic"}
            ).encode(),
        }
        for i in range(images):
            pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            raw[f"{i}.png"] = buffer.getvalue()
        raws.append(raw)
        assert len(processor.encode(texts, images)[0]) == length
    return raws


def supervised_tokens(samples: list[dict]) -> int:
    return sum(int((s["labels"][1:] != IGNORE).sum()) for s in samples)


class PadToLongest:
    """The SiQ-VL collator's layout: right padding to the longest sample of the batch."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.stats: list[tuple[int, int]] = []  # (real tokens, all tokens) per batch

    def __call__(self, samples: list[dict]) -> dict:
        width = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s["input_ids"], s["labels"], 1
        self.stats.append((int(attention_mask.sum()), input_ids.numel()))
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if any(len(s["pixel_values"]) for s in samples):
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
        return batch


class Samples(torch.utils.data.Dataset):
    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


# ------------------------------------------------------------------------------------ timing


def clocks() -> tuple[float, float]:
    """(wall, this process's CPU) seconds."""
    return time.perf_counter(), time.process_time()


class Interleave(TrainerCallback):
    """Times the Trainer's steps and runs one vlscale step after each (outside HF's time).
    Keeps (wall, process CPU) seconds per step for each side."""

    def __init__(self, our_step):
        self.our_step = our_step
        self.theirs: list[tuple[float, float]] = []
        self.ours: list[tuple[float, float]] = []
        self.mark = (0.0, 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark = clocks()

    def on_step_end(self, args, state, control, **kwargs):
        self.theirs.append(tuple(b - a for a, b in zip(self.mark, clocks())))
        self.ours.append(self.our_step())
        self.mark = clocks()


PROFILE_PARTS = [
    "decoder/vision/projector matmuls",
    "LM head matmuls",
    "attention (SDPA)",
    "cross-entropy",
    "elementwise, norms, copies, rest",
]


def profile_breakdown(fwd_bwd, vocab: int) -> dict[str, float]:
    """Seconds of one forward + backward by kind of op (self CPU time of torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fwd_bwd()  # warm
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fwd_bwd()
    parts = dict.fromkeys(PROFILE_PARTS, 0.0)
    for event in prof.key_averages(group_by_input_shape=True):
        name, seconds = event.key, event.self_cpu_time_total / 1e6
        if "scaled_dot_product" in name:
            part = "attention (SDPA)"
        elif name in ("aten::mm", "aten::addmm", "aten::bmm"):
            head = any(vocab in shape for shape in event.input_shapes if shape)
            part = "LM head matmuls" if head else "decoder/vision/projector matmuls"
        elif "log_softmax" in name or "nll_loss" in name:
            part = "cross-entropy"
        else:
            part = "elementwise, norms, copies, rest"
        parts[part] += seconds
    return parts


def packing_report(chunks: list[list[dict]], args) -> None:
    """Packing efficiency, real tokens / (rows x width), of each batch and over the timed ones:
    first-fit-decreasing (the packer before `balanced_rows`) and balanced, as the collate widens
    them (the longest row rounded up to ROW_MULTIPLE). "bound": no packing into equal rows of at
    most --max-seq-len does better: ceil(total / max-seq-len) rows at least, each at least as
    wide as the longest sample and as total / rows."""
    cap = args.max_seq_len

    def width(load: int) -> int:
        return min(cap, -(-load // ROW_MULTIPLE) * ROW_MULTIPLE)

    def area(lengths: list[int], rows: list[list[int]]) -> tuple[int, int]:
        widest = max(sum(lengths[i] for i in row) for row in rows)
        return len(rows), width(widest)

    print(
        f"packing {len(chunks)} batches of {args.batch_size} samples into rows of {cap} "
        f"(width: longest row rounded up to {ROW_MULTIPLE}); batch {args.warmup} on are timed"
    )
    header = "| batch | tokens | longest | FFD rows x width | eff. | balanced rows x width | eff. "
    print(header + "| bound | balanced ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    sums = {"real": 0, "ffd": 0, "balanced": 0, "bound": 0}
    for b, chunk in enumerate(chunks):
        lengths = [len(s["input_ids"]) for s in chunk]
        total = sum(lengths)
        ffd = area(lengths, first_fit_decreasing(lengths, cap))
        start = time.perf_counter()
        rows = balanced_rows(lengths, cap, multiple=ROW_MULTIPLE)
        ms = 1e3 * (time.perf_counter() - start)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        balanced = area(lengths, rows)
        fewest = -(-total // cap)
        bound = fewest * width(max(max(lengths), -(-total // fewest)))
        print(
            f"| {b:5} | {total:6} | {max(lengths):7} | {ffd[0]:7} x {ffd[1]:6} | "
            f"{total / (ffd[0] * ffd[1]):6.1%} | {balanced[0]:12} x {balanced[1]:6} | "
            f"{total / (balanced[0] * balanced[1]):6.1%} | {total / bound:6.1%} | {ms:6.2f} |"
        )
        if b >= args.warmup:
            sums["real"] += total
            sums["ffd"] += ffd[0] * ffd[1]
            sums["balanced"] += balanced[0] * balanced[1]
            sums["bound"] += bound
    real = sums["real"]
    print(
        f"\ntimed batches: packing efficiency first-fit-decreasing {real / sums['ffd']:.1%}, "
        f"balanced {real / sums['balanced']:.1%} ({sums['ffd'] / sums['balanced']:.3f}x fewer "
        f"positions), bound {real / sums['bound']:.1%}"
    )


def attention_report(chunks: list[list[dict]], args) -> None:
    """Forward + backward of one packed attention call, the LM's shapes (4 query / 2 KV heads of
    64, fp32), on a typical packed batch: the first batch that first-fit-decreasing packs into 4
    rows, at width --max-seq-len. Dense: the [rows, 1, L, L] mask build_mask makes and SDPA (the
    CPU path before per-segment attention); per segment: SDPA per sample (`time_both` in
    packed_attention.py: interleaved rounds, median each; the outputs are checked equal first)."""
    cap = args.max_seq_len
    for chunk in chunks:
        lengths = [len(s["input_ids"]) for s in chunk]
        rows = first_fit_decreasing(lengths, cap)
        if len(rows) == 4:
            break
    else:
        raise SystemExit(f"no batch packs into 4 rows of {cap}: try --max-seq-len 1024")
    segment_ids = torch.full((len(rows), cap), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for seg, i in enumerate(row):
            segment_ids[r, start : start + lengths[i]] = seg
            start += lengths[i]
    from packed_attention import time_both  # benchmarks/ is on sys.path for a script

    dense_s, seg_s = time_both(segment_ids, torch.Generator().manual_seed(args.seed))
    real = sum(lengths)
    scores = sum(lengths[i] ** 2 for row in rows for i in row)
    print(
        f"packed attention, forward + backward, q [{len(rows)}, 4, {cap}, 64], k/v 2 heads, fp32, "
        f"threads={torch.get_num_threads()}: {len(lengths)} samples ({real} tokens, longest "
        f"{max(lengths)}) in {len(rows)} rows of {cap}; median of 7 interleaved rounds"
    )
    print(f"| {'':11} | score entries / head | ms     |")
    print(f"| {'-' * 11} | -------------------- | ------ |")
    print(f"| {'dense mask':11} | {len(rows) * cap * cap:20,} | {1e3 * dense_s:6.1f} |")
    print(f"| {'per segment':11} | {scores:20,} | {1e3 * seg_s:6.1f} |")
    print(f"\nper segment is {dense_s / seg_s:.2f}x faster")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    total = args.warmup + args.steps
    B = args.batch_size
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)

    torch.manual_seed(args.seed)
    write_tokenizer(root / "tokenizer", args.vocab)
    write_hf_towers(root, args)
    seed_everything(args.seed)
    ours, cfg = build_ours(root, args)

    # The task's own ChatML processor and train decoder turn raw samples into ids, labels and
    # pixels (outside the timing: both sides train on the same decoded samples).
    raws = make_raw_samples(total * B, args, ours.processor, ours.vision.image_size)
    samples = [ours.train_decoder(raw) for raw in raws]
    chunks = [samples[i * B : (i + 1) * B] for i in range(total)]
    if args.packing_only or args.attention_only:
        report = packing_report if args.packing_only else attention_report
        report(chunks, args)
        tmp.cleanup()
        return

    theirs = build_theirs(root, ours)
    dist = init_distributed()
    engine = build_engine(ours, cfg, dist, args.lr, total)
    pack = ours.packed_collate()  # balanced rows of data.max_seq_len
    pad = PadToLongest(ours.tokenizer.pad_token_id)  # the id the task packs with

    # Same weights, same function: the loss of the first batch on both sides.
    with torch.no_grad():
        first = pack(chunks[0])  # the task returns a sum over its supervised tokens
        loss_ours = float(ours(first).loss) / ours.loss_weight(first)
        loss_theirs = float(theirs(**pad(chunks[0])).loss)
    pad.stats.clear()

    our_stats: list[tuple[int, int]] = []  # (real tokens, all tokens) per packed batch

    def packed_batches():
        for chunk in chunks:
            batch = pack(chunk)
            our_stats.append((batch["real_tokens"], batch["input_ids"].numel()))
            yield batch

    stream = packed_batches()

    our_tokens: list[int] = []

    def our_step() -> tuple[float, float]:
        start = clocks()
        result = train_step(ours, engine, stream, 1, dist)
        elapsed = tuple(b - a for a, b in zip(start, clocks()))
        our_tokens.append(result.tokens)
        return elapsed

    timer = Interleave(our_step)
    training_args = TrainingArguments(
        output_dir=str(root / "hf"),
        use_cpu=True,
        per_device_train_batch_size=B,
        max_steps=total,
        learning_rate=args.lr,
        weight_decay=0.0,
        adam_beta2=0.95,
        warmup_steps=0,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = Trainer(
        model=theirs,
        args=training_args,
        train_dataset=Samples(samples),
        data_collator=pad,
        callbacks=[timer],
    )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # its final summary
    trainer.train()
    assert len(timer.ours) == len(timer.theirs) == total

    timed = slice(args.warmup, total)
    sup = sum(supervised_tokens(c) for c in chunks[timed])
    assert sup == sum(our_tokens[timed]), "vlscale counted other supervised tokens"
    wall_ours, wall_theirs = ([w for w, _ in t[timed]] for t in (timer.ours, timer.theirs))
    t_ours, t_theirs = sum(wall_ours), sum(wall_theirs)
    cpu_ratio = sum(c for _, c in timer.theirs[timed]) / sum(c for _, c in timer.ours[timed])
    rate_ours, rate_theirs = sup / t_ours, sup / t_theirs
    pad_frac = lambda stats: 1 - sum(r for r, _ in stats[timed]) / sum(a for _, a in stats[timed])
    fed = lambda stats: statistics.mean(a for _, a in stats[timed])
    lengths = [len(s["input_ids"]) for s in samples]
    paired = statistics.median(t / o for o, t in zip(wall_ours, wall_theirs))
    n_params = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)

    print(
        f"tiny VLM: SigLIP 64px/8 w128 x4 (frozen) -> shuffle 2 ({ours.tokens_per_image} tok/img)"
        f" -> linear -> Qwen2 w256 x4, vocab {args.vocab}; trained params ours "
        f"{n_params(ours) / 1e6:.2f} M, theirs {n_params(theirs) / 1e6:.2f} M; fp32, "
        f"threads={torch.get_num_threads()}, transformers {transformers.__version__}"
    )
    print(
        f"data: {len(samples)} samples, length median {statistics.median(lengths):.0f} mean "
        f"{statistics.mean(lengths):.0f} max {max(lengths)}; batch {B} samples/step, "
        f"{args.steps} timed steps after {args.warmup} warm-up; vlscale rows of {args.max_seq_len}"
    )
    print(
        f"loss of batch 0 before training: vlscale {loss_ours:.6f}  transformers "
        f"{loss_theirs:.6f}  (|diff| {abs(loss_ours - loss_theirs):.1e})"
    )
    print()
    print(f"| {'':34} | supervised tok/s | tokens fed/step | padding | s/step |")
    print(f"| {'-' * 34} | ---------------- | --------------- | ------- | ------ |")
    rows = [
        ("vlscale (packing, VLMTask)", rate_ours, our_stats, t_ours),
        ("SiQ-VL stack (HF Trainer, pad)", rate_theirs, pad.stats, t_theirs),
    ]
    for name, rate, stats, t in rows:
        print(
            f"| {name:34} | {rate:16.0f} | {fed(stats):15.0f} | {100 * pad_frac(stats):6.1f}% | "
            f"{t / args.steps:6.3f} |"
        )
    print(
        f"\nratio vlscale / HF: {rate_ours / rate_theirs:.2f}x  (goal >= 2x; median of the "
        f"per-step ratios {paired:.2f}x; ratio of process CPU time {cpu_ratio:.2f}x)"
    )
    steps = zip(wall_ours, wall_theirs)
    print(
        "per step, s vlscale / s HF (ratio):",
        "  ".join(f"{o:.2f}/{t:.2f} ({t / o:.2f})" for o, t in steps),
    )

    if args.profile:
        batch = chunks[args.warmup]
        packed, padded = pack(batch), pad(batch)

        def ours_fwd_bwd():
            (ours(packed).loss / ours.loss_weight(packed)).backward()
            ours.zero_grad(set_to_none=True)

        def theirs_fwd_bwd():
            theirs(**padded).loss.backward()
            theirs.zero_grad(set_to_none=True)

        mine, hf = (
            profile_breakdown(ours_fwd_bwd, args.vocab),
            profile_breakdown(theirs_fwd_bwd, args.vocab),
        )
        print(
            f"\nprofile of one forward + backward on the batch of step {args.warmup} "
            f"(self CPU seconds):"
        )
        print(f"| {'':34} | vlscale | SiQ-VL stack |")
        print(f"| {'-' * 34} | ------- | ------------ |")
        for part in [*PROFILE_PARTS, "total"]:
            a = sum(mine.values()) if part == "total" else mine[part]
            b = sum(hf.values()) if part == "total" else hf[part]
            print(f"| {part:34} | {a:7.2f} | {b:12.2f} |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
