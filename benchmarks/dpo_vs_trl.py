"""A DPO training step: vlscale's stage 4 (`vlm_dpo`) vs TRL's `DPOTrainer`, side by side.

    python benchmarks/dpo_vs_trl.py [--steps 8 --warmup 1 --pairs 16 --max-seq-len 256
                                     --vocab 8192 --threads 1 --profile]

One tiny VLM with the same weights on both sides, LoRA on the LM as the policy and the LM with
its adapters off as the reference (B = 0 at the start, so policy = reference and the first loss is
ln 2 on both sides: asserted), sigmoid loss, beta 0.1, the same preference pairs in the same order,
`--pairs` pairs per optimizer step, fp32, CPU, one torch thread by default (`--threads`):

  vision 64 px / patch 8 (64 patches), width 128, 4 layers (frozen)
  -> pixel shuffle 2 (16 tokens per image) -> linear 512 -> 256 (frozen)
  -> Qwen2 LM width 256, 4 layers, 4 query / 2 KV heads, MLP 1024, tied embeddings,
     vocabulary `--vocab`; LoRA r 16, alpha 32, no dropout on q/k/v/o/gate/up/down (trained)

The towers are benchmarks/vlm_vs_hf.py's (transformers builds SigLIP and Qwen2 from configs and
saves them; vlscale loads the checkpoints). TRL needs a transformers VLM class with a processor:
`Idefics3ForConditionalGeneration` is this architecture (SigLIP-style tower, the same pixel
shuffle, a bias-free linear connector, any decoder LM), so it is built with a Qwen2 text config
and given the same tower, LM and projector weights (vlscale's projector bias is zeroed to match);
the image embeddings of both sides are checked equal before training. Its `Idefics3Processor`
(no image splitting, 64 px) uses vlscale's chat template (Qwen2.5 ChatML with the default system
prompt) with images written as Idefics3's `<image>`.

Data: the synthetic shapes shards' preference pairs (core/data/synthetic.py `preference_pair`:
prompt "Describe the image.", chosen the true caption, rejected the caption with one colour
changed), written as `vlscale shards synthetic` writes them (64 px JPEGs). vlscale reads the raw
shard samples with its task's `PreferenceTrainDecoder` and packs both sequences of every pair into
rows of `--max-seq-len` (`PreferenceCollate`); TRL gets them in its documented vision format
(`images`, conversational `prompt` / `chosen` / `rejected`) as a `datasets.Dataset` of the same
JPEG bytes, and its `DataCollatorForVisionPreference` processes them (images repeated for chosen
and rejected) and pads to the longest sequence.

Timing is interleaved step by step in one process, as in vlm_vs_hf.py: the DPOTrainer runs its
normal loop, and a callback runs one vlscale step on the same pairs at each `on_step_end`. Both
times go from raw pairs (JPEG bytes and texts) to the optimizer update: TRL's is the wall time
between two callbacks (its data loading, image decoding and processing, collation, policy and
reference forwards, backward, clipping, AdamW, cosine schedule, its metrics and logging);
vlscale's is its decoding, packing and `train_step` (ddp engine, same AdamW and schedule).
Padding fraction: the positions fed to the LM that are padding, over all positions fed
(vlscale: packed rows, the last row's tail; TRL: 2 x pairs rows padded to the longest).
Images encoded and vision seconds: images through the vision tower per step and the wall time of
its forwards (forward hooks). LM-head positions: the positions whose hidden state the LM head
projects to the vocabulary, policy and reference forwards together (vlscale: the supervised
targets; TRL on CPU: every position, see `their_scored`).

Peak memory is measured on one more step of each side after the timed ones, with torch's profiler
(`profile_memory`, its memory timeline on CPU): the most bytes of tensors alive at once during the
step (data loading excluded), and how much of that the step allocated itself (activations,
gradients, temporaries) over the tensors alive at its start that it uses (weights, optimizer
state). It counts tensor allocations, not the process's RSS (malloc caching, Python objects).
`--profile` then splits one forward + backward of each side by kind of op.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import datasets
import torch
import transformers
import trl
from peft import LoraConfig
from torch.profiler import ProfilerActivity, profile
from transformers import AutoTokenizer, TrainerCallback
from transformers.models.idefics3 import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from vlm_vs_hf import clocks, write_hf_towers  # benchmarks/ is on sys.path for a script

from core.data.shards import open_shard
from core.data.synthetic import record_texts, write_synthetic_shards
from core.data.tokenizer import train_vlm_tokenizer
from core.distributed import init_distributed
from core.engines import build_engine
from core.loop import seed_everything, train_step
from core.recipe import config_from_dict
from core.tasks import build_task
from core.tasks.vlm_dpo import VLMDPOTask

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMAGE_SIZE = 64
GLOBAL_IMAGE_TAG = "<global-img>"  # Idefics3Processor writes it before each image's tokens


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--pairs", type=int, default=16, help="preference pairs per optimizer step")
    p.add_argument("--max-seq-len", type=int, default=256, help="vlscale's packed row length")
    p.add_argument("--vocab", type=int, default=8192, help="the LM's vocabulary (embedding rows)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="then profile one step of each side")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default). 1: on a shared machine two threads per\n"
        "process stall on each other whenever another process takes a core",
    )
    return p.parse_args()


# ------------------------------------------------------------------------------------ setup


def write_pairs(root: Path, n: int, seed: int) -> list[dict]:
    """`n` shapes samples as `vlscale shards synthetic` writes them, read back raw, and a VLM
    tokenizer (Qwen2.5's specials and chat template) trained on their texts."""
    write_synthetic_shards(root / "shapes", n_train=n, n_val=0, seed=seed, shard_size=n,
                           image_size=IMAGE_SIZE)  # fmt: skip
    shard = open_shard(str(root / "shapes" / "train-000000.tar"))
    raws = [shard.read(i) for i in range(len(shard))]
    texts = [text for raw in raws for text in record_texts(json.loads(raw["json"]))]
    train_vlm_tokenizer(texts, root / "tokenizer", vocab_size=1024)
    return raws


def build_ours(root: Path, args, total_steps: int) -> tuple[VLMDPOTask, object]:
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
                "kind": "vlm_dpo",
                "stage": "sft",
                "lm_tuning": "lora",
                "lora": {
                    "r": args.lora_r,
                    "alpha": args.lora_alpha,
                    "dropout": 0.0,
                    "targets": LORA_TARGETS,
                },
                "projector": {"kind": "linear", "pixel_shuffle": 2},
                "dpo": {"beta": args.beta, "loss": "sigmoid", "reference": "lora"},
            },
            "data": {"batch_size": args.pairs, "max_seq_len": args.max_seq_len},
            "optim": {
                "lr": args.lr,
                "weight_decay": 0.0,
                "warmup_steps": 0,
                "max_steps": total_steps,
                "grad_clip": 1.0,
            },
            "engine": {"kind": "ddp", "precision": "fp32"},
            "logging": {"wandb": {"mode": "disabled"}},
        }
    )
    task = build_task(cfg)
    # Idefics3's connector has no bias: a zero bias makes vlscale's projector the same function
    # (it is frozen in this mode, so it stays zero).
    with torch.no_grad():
        task.projector.proj.bias.zero_()
    return task, cfg


def build_theirs(root: Path, ours: VLMDPOTask, args):
    """Idefics3ForConditionalGeneration with vlscale's weights, and its processor."""
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    # The processor adds <fake_token_around_image>, <image> and <end_of_utterance>; the global
    # image tag it writes must be one token too (else BPE splits it into several).
    tokenizer.add_special_tokens({"additional_special_tokens": [GLOBAL_IMAGE_TAG]})
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
        image_mean=list(ours.vision.image_mean),
        image_std=list(ours.vision.image_std),
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=ours.tokens_per_image,
        # vlscale's own rendering (system prompt added, images before the text), with images
        # written as the placeholder Idefics3's processor expands
        chat_template=ours.processor.chat.export_template(ours.processor.system_prompt, "<image>"),
    )
    assert len(tokenizer) <= args.vocab, "the LM's vocabulary must cover TRL's added tokens"

    vision = transformers.SiglipVisionConfig.from_pretrained(root / "vision")
    text = transformers.Qwen2Config.from_pretrained(root / "lm")
    names = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "image_size", "patch_size", "layer_norm_eps", "hidden_act"]  # fmt: skip
    config = Idefics3Config(
        vision_config={name: getattr(vision, name) for name in names},
        text_config=text.to_dict(),
        scale_factor=ours.projector.factor,
        image_token_id=processor.image_token_id,
        tie_word_embeddings=True,
    )
    model = Idefics3ForConditionalGeneration(config)
    siglip = transformers.SiglipVisionModel.from_pretrained(root / "vision").state_dict()
    qwen2 = transformers.Qwen2ForCausalLM.from_pretrained(root / "lm").state_dict()
    state = {f"model.vision_model.{k}": v for k, v in siglip.items()}
    state |= {
        k if k == "lm_head.weight" else "model.text_model." + k.removeprefix("model."): v
        for k, v in qwen2.items()
    }
    state["model.connector.modality_projection.proj.weight"] = ours.projector.proj.weight.detach()
    model.load_state_dict(state, strict=True)  # every weight of both sides, and nothing else
    return model.train(), processor


def trl_dataset(raws: list[dict]) -> datasets.Dataset:
    """TRL's vision preference format: the same JPEG bytes (decoded when a row is read) and the
    pairs' texts as conversational messages."""
    rows = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for raw in raws:
        pair = json.loads(raw["json"])["preference"]
        rows["images"].append([{"bytes": raw["jpg"], "path": None}])
        rows["prompt"].append([{"role": "user", "content": pair["prompt"]}])
        rows["chosen"].append([{"role": "assistant", "content": pair["chosen"]}])
        rows["rejected"].append([{"role": "assistant", "content": pair["rejected"]}])
    dataset = datasets.Dataset.from_dict(rows)
    return dataset.cast_column("images", datasets.List(datasets.Image()))


def check_same_image_embeddings(ours: VLMDPOTask, theirs, pixels: torch.Tensor) -> float:
    """Both sides' projected image embeddings of the same pixels: the same weights and the same
    function (tower, pixel shuffle, projector)."""
    with torch.no_grad():
        a = ours.projector(ours.vision_features(pixels))
        b = torch.cat(theirs.model.get_image_features(pixels[:, None]).pooler_output)
    diff = (a.reshape(-1, a.shape[-1]) - b).abs().max().item()
    assert diff < 1e-4, f"image embeddings differ by {diff}"
    return diff


# ------------------------------------------------------------------------------------ counting


class TowerMeter:
    """Images through a vision tower and the wall seconds its forwards take (forward hooks)."""

    def __init__(self, module: torch.nn.Module):
        self.images, self.seconds, self.start = 0, 0.0, 0.0
        module.register_forward_pre_hook(self._begin)
        module.register_forward_hook(self._end, with_kwargs=True)

    def _begin(self, _module, _args):
        self.start = time.perf_counter()

    def _end(self, _module, args, kwargs, _out):
        self.seconds += time.perf_counter() - self.start
        self.images += len(args[0] if args else kwargs["pixel_values"])

    def take(self) -> tuple[int, float]:
        taken = self.images, self.seconds
        self.images, self.seconds = 0, 0.0
        return taken


def counting_collator(collator):
    """TRL's collator, recording (real positions, all positions, rows, seconds) of each batch it
    makes (its seconds: tokenizing and image processing; the JPEG decoding is before it)."""
    stats: list[tuple[int, int, int, float]] = []

    def collate(examples):
        start = time.perf_counter()
        batch = collator(examples)
        seconds = time.perf_counter() - start
        ids = batch["input_ids"]
        stats.append((int(batch["attention_mask"].sum()), ids.numel(), len(ids), seconds))
        return batch

    return collate, stats


def peak_tensor_memory(prof) -> tuple[int, int]:
    """(peak bytes of tensors alive at once, bytes alive at the start) from the profiler's
    memory timeline of CPU tensors."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        with warnings.catch_warnings():  # deprecated for CUDA's snapshots; CPU has no other
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(s) for s in sizes]
    return max(totals), totals[0]


def memory_profiler():
    return profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    )


PROFILE_PARTS = [
    "LM head (logits) matmuls",
    "other matmuls (vision, projector, decoder, LoRA)",
    "attention (SDPA)",
    "log-softmax, cross-entropy, logsumexp",
    "elementwise, norms, copies, rest",
]


def profile_parts(fwd_bwd, vocab: int) -> dict[str, float]:
    """Self CPU seconds of one forward + backward by kind of op (torch's profiler)."""
    fwd_bwd()  # warm
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fwd_bwd()
    parts = dict.fromkeys(PROFILE_PARTS, 0.0)
    for event in prof.key_averages(group_by_input_shape=True):
        name, seconds = event.key, event.self_cpu_time_total / 1e6
        if "scaled_dot_product" in name:
            part = PROFILE_PARTS[2]
        elif name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"):
            # TRL's chunked log-probs accumulate the logits with addmm_
            head = any(vocab in shape for shape in event.input_shapes if shape)
            part = PROFILE_PARTS[0] if head else PROFILE_PARTS[1]
        elif any(k in name for k in ("log_softmax", "nll_loss", "logsumexp", "cross_entropy")):
            part = PROFILE_PARTS[3]
        else:
            part = PROFILE_PARTS[4]
        parts[part] += seconds
    return parts


class Interleave(TrainerCallback):
    """Times the DPOTrainer's steps and runs one vlscale step after each (outside TRL's time);
    the last step of each side runs under the memory profiler instead of being timed."""

    def __init__(self, our_step, profiled_step: int, tower: TowerMeter):
        self.our_step, self.profiled_step, self.tower = our_step, profiled_step, tower
        self.theirs: list[tuple[float, float]] = []  # (wall, process CPU) seconds
        self.ours: list[tuple[float, float]] = []
        self.their_tower: list[tuple[int, float]] = []  # (images, seconds) per step
        self.mark = (0.0, 0.0)
        self.prof = None
        self.memory: dict[str, tuple[int, int]] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark = clocks()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.profiled_step:
            self.prof = memory_profiler().__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.memory["theirs"] = peak_tensor_memory(self.prof)
            with memory_profiler() as prof:
                self.our_step(profiled=True)
            self.memory["ours"] = peak_tensor_memory(prof)
            self.prof = None
            return
        self.theirs.append(tuple(b - a for a, b in zip(self.mark, clocks())))
        self.their_tower.append(self.tower.take())
        self.ours.append(self.our_step())
        self.mark = clocks()


# ------------------------------------------------------------------------------------ main


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    timed = args.warmup + args.steps
    total = timed + 1  # and one more, under the memory profiler
    P = args.pairs
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)

    raws = write_pairs(root, total * P, args.seed)
    torch.manual_seed(args.seed)
    write_hf_towers(root, args)
    seed_everything(args.seed)
    ours, cfg = build_ours(root, args, total)
    theirs, processor = build_theirs(root, ours, args)
    dist = init_distributed()
    engine = build_engine(ours, cfg, dist, args.lr, total)
    chunks = [raws[i * P : (i + 1) * P] for i in range(total)]
    pack = ours.packed_collate()
    diff = check_same_image_embeddings(
        ours, theirs, torch.stack([ours.train_decoder(r)["pixel_values"][0] for r in chunks[0]])
    )

    # TRL's side: its defaults but fp32 (bf16 is on by default) and no activation checkpointing
    # (on by default; vlscale runs without), and the Trainer settings vlm_vs_hf.py matches.
    their_collate, their_stats = counting_collator(DataCollatorForVisionPreference(processor))
    dpo_args = DPOConfig(
        output_dir=str(root / "trl"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        beta=args.beta,
        loss_type=["sigmoid"],
        per_device_train_batch_size=P,
        max_steps=total,
        learning_rate=args.lr,
        weight_decay=0.0,
        adam_beta2=0.95,
        warmup_steps=0,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,  # each step's loss: the first one is checked
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        target_modules=rf".*text_model.*\.({'|'.join(LORA_TARGETS)})",  # the LM's, as vlscale's
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = DPOTrainer(
        model=theirs,
        args=dpo_args,
        train_dataset=trl_dataset(raws),
        processing_class=processor,
        data_collator=their_collate,
        peft_config=lora,
    )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    n_trained = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n_trained(ours) == n_trained(trainer.model), (n_trained(ours), n_trained(trainer.model))

    # Policy = reference before the first step: ln 2 on both sides, on the first step's pairs.
    with torch.no_grad():
        first = pack([ours.train_decoder(raw) for raw in chunks[0]])
        loss_ours = float(ours(first).loss) / ours.loss_weight(first)
        examples = [trainer.train_dataset[i] for i in range(P)]
        loss_theirs = float(trainer.compute_loss(trainer.model, their_collate(examples)))
    trainer._metrics["train"].clear()
    their_stats.clear()
    for name, loss in (("vlscale", loss_ours), ("TRL", loss_theirs)):
        assert abs(loss - math.log(2)) < 1e-6, f"{name}'s first DPO loss {loss} is not ln 2"

    our_tower = TowerMeter(ours.vision)
    their_tower = TowerMeter(trainer.model.get_base_model().model.vision_model)
    our_stats: list[tuple[int, int, int, float]] = []  # as their_stats (rows unused)
    our_scored: list[int] = []  # positions the LM head projects
    our_losses: list[float] = []
    our_tower_steps: list[tuple[int, float]] = []
    step = iter(range(total))

    def our_step(profiled: bool = False) -> tuple[float, float]:
        chunk = chunks[next(step)]
        if profiled:  # the memory of the step itself, as TRL's (its data loading is outside)
            batch = pack([ours.train_decoder(raw) for raw in chunk])
            train_step(ours, engine, iter([batch]), 1, dist)
            return 0.0, 0.0
        start = clocks()
        batch = pack([ours.train_decoder(raw) for raw in chunk])
        data = time.perf_counter() - start[0]
        result = train_step(ours, engine, iter([batch]), 1, dist)
        elapsed = tuple(b - a for a, b in zip(start, clocks()))
        our_stats.append((batch["real_tokens"], batch["input_ids"].numel(), 0, data))
        our_losses.append(result.loss)
        our_tower_steps.append(our_tower.take())
        our_scored.append(2 * batch["supervised_tokens"])  # policy and reference
        return elapsed

    timer = Interleave(our_step, profiled_step=timed, tower=their_tower)
    trainer.add_callback(timer)
    trainer.train()
    assert len(timer.ours) == len(timer.theirs) == timed and set(timer.memory) == {"ours", "theirs"}
    their_losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    for name, loss in (("vlscale", our_losses[0]), ("TRL", their_losses[0])):
        assert abs(loss - math.log(2)) < 1e-6, f"{name}'s step-1 training loss {loss} is not ln 2"

    window = slice(args.warmup, timed)
    wall_ours, wall_theirs = ([w for w, _ in t[window]] for t in (timer.ours, timer.theirs))
    t_ours, t_theirs = sum(wall_ours), sum(wall_theirs)
    rate_ours, rate_theirs = args.steps * P / t_ours, args.steps * P / t_theirs
    cpu_ratio = sum(c for _, c in timer.theirs[window]) / sum(c for _, c in timer.ours[window])
    paired = statistics.median(t / o for o, t in zip(wall_ours, wall_theirs))
    real = lambda stats: sum(s[0] for s in stats[window])
    fed = lambda stats: sum(s[1] for s in stats[window])
    # TRL's collator also ran for the profiled step: its stats have one more batch
    their_stats = their_stats[:timed]
    mb = lambda n: n / 2**20

    print(
        f"tiny VLM: vision 64px/8 w128 x4 (frozen) -> shuffle 2 ({ours.tokens_per_image} tok/img)"
        f" -> linear -> Qwen2 w256 x4, vocab {args.vocab}; LoRA r {args.lora_r} alpha "
        f"{args.lora_alpha} on the LM: {n_trained(ours) / 1e3:.0f} k trained params each side; "
        f"fp32, threads={torch.get_num_threads()}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}"
    )
    print(
        f"data: {len(raws)} shapes preference pairs, {P} per step, {args.steps} timed steps after "
        f"{args.warmup} warm-up; vlscale rows of {args.max_seq_len}; real tokens per pair "
        f"vlscale {real(our_stats) / (args.steps * P):.1f}, TRL "
        f"{real(their_stats) / (args.steps * P):.1f}"
    )
    print(
        f"same image embeddings on both sides (max |diff| {diff:.1e}); DPO loss before training "
        f"(policy = reference): vlscale {loss_ours:.6f}  TRL {loss_theirs:.6f}  (ln 2 = "
        f"{math.log(2):.6f}); step-1 training loss vlscale {our_losses[0]:.6f}  TRL "
        f"{their_losses[0]:.6f}; last step vlscale {our_losses[-1]:.4f}  TRL "
        f"{their_losses[timed - 1]:.4f}"
    )
    # Positions the LM head projects, policy and reference forwards: vlscale's supervised targets;
    # TRL on CPU every position but each row's last (its fused head scores only the completion
    # positions on CUDA / XPU with Triton: trl/trainer/utils.py add_fused_lm_head).
    their_scored = [2 * (numel - rows) for _, numel, rows, _ in their_stats]
    sides = [
        ("vlscale (vlm_dpo, packed)", rate_ours, our_stats, our_scored, our_tower_steps, t_ours,
         "ours"),
        ("TRL DPOTrainer (Idefics3)", rate_theirs, their_stats, their_scored, timer.their_tower,
         t_theirs, "theirs"),
    ]  # fmt: skip
    columns = ["pairs / s", "positions fed / step", "padding", "LM-head positions / step",
               "images encoded / step", "vision s / step", "data s / step", "s / step",
               "peak tensor memory (step's own)"]  # fmt: skip
    print()
    print(f"| {'':26} | " + " | ".join(columns) + " |")
    print(f"| {'-' * 26} | " + " | ".join("-" * len(c) for c in columns) + " |")
    for name, rate, stats, scored, tower, t, side in sides:
        peak, start = timer.memory[side]
        cells = [
            f"{rate:.2f}",
            f"{fed(stats) / args.steps:.0f}",
            f"{100 * (1 - real(stats) / fed(stats)):.1f}%",
            f"{statistics.mean(scored[window]):.0f}",
            f"{statistics.mean(n for n, _ in tower[window]):.0f}",
            f"{statistics.mean(s for _, s in tower[window]):.3f}",
            f"{statistics.mean(s[3] for s in stats[window]):.3f}",
            f"{t / args.steps:.3f}",
            f"{mb(peak):.0f} MiB ({mb(peak - start):.0f} MiB)",
        ]
        print(
            f"| {name:26} | " + " | ".join(f"{c:>{len(h)}}" for c, h in zip(cells, columns)) + " |"
        )
    print(
        f"\nratio vlscale / TRL: {rate_ours / rate_theirs:.2f}x pairs/s  (goal >= 2x; median of "
        f"the per-step ratios {paired:.2f}x; ratio of process CPU time {cpu_ratio:.2f}x); peak "
        f"tensor memory TRL / vlscale "
        f"{timer.memory['theirs'][0] / timer.memory['ours'][0]:.2f}x"
    )
    print(
        "per step, s vlscale / s TRL (ratio):",
        "  ".join(f"{o:.2f}/{t:.2f} ({t / o:.2f})" for o, t in zip(wall_ours, wall_theirs)),
    )
    if args.profile:
        # The batch of the first timed step, collated by each side (outside the profile).
        chunk = range(args.warmup * P, (args.warmup + 1) * P)
        packed = pack([ours.train_decoder(raws[i]) for i in chunk])
        padded = their_collate([trainer.train_dataset[i] for i in chunk])

        def ours_fwd_bwd():
            (ours(packed).loss / ours.loss_weight(packed)).backward()
            ours.zero_grad(set_to_none=True)

        def theirs_fwd_bwd():
            trainer.compute_loss(trainer.model, padded).backward()
            trainer.model.zero_grad(set_to_none=True)

        mine = profile_parts(ours_fwd_bwd, args.vocab)
        hf = profile_parts(theirs_fwd_bwd, args.vocab)
        print(
            f"\nprofile of one forward + backward (policy and reference) on the batch of step "
            f"{args.warmup}, self CPU seconds:"
        )
        print(f"| {'':48} | vlscale | TRL   |")
        print(f"| {'-' * 48} | ------- | ----- |")
        for part in [*PROFILE_PARTS, "total"]:
            a = sum(mine.values()) if part == "total" else mine[part]
            b = sum(hf.values()) if part == "total" else hf[part]
            print(f"| {part:48} | {a:7.3f} | {b:5.3f} |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
