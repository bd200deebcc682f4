"""lmms-eval model `vlscale`: evaluate a VLM run on lmms-eval's benchmarks (MMStar, VQAv2, ...).

    lmms-eval --model vlscale --model_args run_dir=runs/siq_vl_stage2 --tasks mmstar

lmms-eval finds the model through the `lmms_eval.models` entry point in pyproject.toml (its
supported plugin mechanism; `pip install -e '.[eval]'` registers it), which names `manifest`.
The run's newest checkpoint is loaded as `vlscale generate` loads it (any engine, LoRA
adapters included). Prompts go through the task's own `prompt_batch`, so questions are rendered
with the run's chat template and images exactly as in training-time evaluation.

model_args: run_dir (required), step (default: the newest checkpoint), device (default: cuda
if available), max_new_tokens (when a task sets none: the run's exported generation config's,
min(512, data.max_seq_len)), precision (fp32 | bf16 autocast). The batch size is lmms-eval's
own `--batch_size` (it passes it to every model, so it cannot also be a model_arg).

- generate_until: batched (requests with the same generation kwargs together); greedy unless
  the task asks for sampling (temperature > 0 or do_sample) or beams; the answer ends at the
  end-of-turn token or `max_new_tokens`, then is cut at the first of the task's `until` strings.
- loglikelihood: the continuation's negative log-likelihood, -sum log p(continuation tokens |
  prompt, images), the continuation tokenised on its own and appended to the generation prompt
  (the tokens the model would have to generate), and whether greedy decoding produces it. Negative,
  because lmms-eval 0.7 ranks `multiple_choice` answers by the smallest value (api/task.py,
  `pred = np.argmin(lls)`: its own models return their loss; lmms-eval issue #370), unlike
  lm-evaluation-harness's contract of a log-likelihood. (lmms-eval 0.7 to 0.7.3 cannot yet run
  such tasks for any model: its evaluator turns each (value, is_greedy) into a string.)
- generate_until_multi_round is not supported (lmms-eval's base class declares it; its own
  models raise NotImplementedError too).

Only this module imports lmms_eval: core/ and the `vlscale` command never do.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
# generation_kwargs keys this model uses; others (model-specific ones some tasks carry, such as
# image_aspect_ratio) are ignored with a warning
GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "top_k",
                   "num_beams", "length_penalty")  # fmt: skip


def manifest():
    """The `lmms_eval.models` entry point: lmms-eval imports the class only when it is used."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlscale", simple_class_path=f"{__name__}.VLScale")


class VLScale(lmms):
    """A vlscale VLM run as an lmms-eval "simple" model: it gets each question as text plus the
    doc's images (PIL, from the task's doc_to_visual) and renders the chat prompt itself."""

    is_simple = True

    def __init__(
        self,
        run_dir: str,
        step: int | str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str | None = None,
        precision: str = "fp32",
        max_batch_size: int | None = None,  # lmms-eval passes it to every model; unused
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            valid = "run_dir, step, device, batch_size, max_new_tokens, precision"
            raise ValueError(f"vlscale: unknown model_args {sorted(unknown)}; valid: {valid}")
        if precision not in PRECISIONS:
            raise ValueError(f"vlscale: precision={precision!r}; choose from {list(PRECISIONS)}")
        if str(batch_size).startswith("auto"):
            raise ValueError("vlscale: batch_size=auto is not supported; give a number")
        from core.tasks import Generative
        from launch.export import consolidated

        task, cfg, _ = consolidated(run_dir, None if step in (None, "") else int(step))
        if not isinstance(task, Generative):
            raise ValueError(f"vlscale: {run_dir} is a task.kind={cfg.task.kind} run, whose "
                             "task does not generate (lmms-eval needs a VLM run)")  # fmt: skip
        self._rank, self._world_size = 0, 1
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self._data_parallel()
        self.task = task.to(self._device).eval()
        self.batch_size_per_gpu = int(batch_size)
        # As the exported generation_config.json (VLMTask._export_lm_files)
        self.max_new_tokens = int(max_new_tokens or min(512, cfg.data.max_seq_len))
        self.autocast_dtype = PRECISIONS[precision]
        self._warned: set[str] = set()

    def _data_parallel(self) -> None:
        """Under `accelerate launch` (one process per GPU) each process loads the model on its own
        GPU and lmms-eval hands it its share of the docs, as its own models do (not tested here:
        no GPUs)."""
        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            self.accelerator = accelerator
            self._device = torch.device(f"cuda:{accelerator.local_process_index}")
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ requests
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # one generation setting per batch
        for i, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vlscale generate")
        for indices in groups.values():
            options, until = self.generation_options(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                items = [self.prompt_item(requests[i].args) for i in chunk]
                with self.autocast():
                    texts = self.task.generate(self.prompt_batch(items), **options)
                for i, text in zip(chunk, texts, strict=True):
                    answers[i] = cut_at(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], answers[i])
                bar.update(len(chunk))
        bar.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vlscale loglikelihood")
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start : start + self.batch_size]]
            items, continuations = [], []
            for args in chunk:
                items.append(self.prompt_item(args) if len(args) > 2 else (args[0], []))
                target = args[1]
                if callable(target):  # a doc_to_target function
                    context, target, doc_to_visual, doc_id, task, split = args
                    target = target(self.task_dict[task][split][doc_id])
                continuations.append(str(target))
            with self.autocast():
                scored = self.score(items, continuations)
            # lmms-eval picks the smallest: the loss, not the log-likelihood (module docstring)
            results += [(-logprob, greedy) for logprob, greedy in scored]
            bar.update(len(chunk))
        bar.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "vlscale: multi-round generation (generate_until_multi_round tasks) is not supported"
        )

    # ------------------------------------------------------------------ model
    @torch.no_grad()
    def score(self, items: list[tuple[str, list[bytes]]], continuations: list[str]):
        """(sum of log p(continuation | prompt), whether greedy decoding gives it) per item.

        The prompts are left-padded by the task's prompt_batch; each continuation follows its
        prompt, right-padded. Positions count real tokens only and causal attention never sees
        the right padding, so every row scores as it would alone."""
        task = self.task
        batch = self.prompt_batch(items)
        ids = [task.tokenizer.encode(c, add_special_tokens=False) for c in continuations]
        if any(task.image_token_id in row for row in ids):
            raise ValueError("vlscale: a continuation contains the image placeholder token")
        width = max(1, *map(len, ids))
        rows = len(ids)
        cont = torch.full((rows, width), task.tokenizer.pad_token_id, dtype=torch.long)
        cont_mask = torch.zeros((rows, width), dtype=torch.long)
        for b, row in enumerate(ids):
            cont[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            cont_mask[b, : len(row)] = 1
        input_ids = torch.cat([batch["input_ids"], cont.to(self.device)], dim=1)
        mask = torch.cat([batch["attention_mask"], cont_mask.to(self.device)], dim=1)
        embeds = task.input_embeddings(input_ids, batch["pixel_values"])
        hidden = task.lm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True)
        prompt_len = batch["input_ids"].shape[1]
        out = []
        for b, row in enumerate(ids):
            if not row:  # nothing to score: probability 1
                out.append((0.0, True))
                continue
            # the hidden state before each continuation token predicts it
            logits = task.lm.lm_head(hidden[b, prompt_len - 1 : prompt_len - 1 + len(row)])
            logp = F.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(row, device=logp.device)
            total = logp.gather(1, target[:, None]).sum().item()
            out.append((total, bool((logp.argmax(-1) == target).all())))
        return out

    def prompt_batch(self, items: list[tuple[str, list[bytes]]]) -> dict:
        batch = self.task.prompt_batch(items)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def prompt_item(self, args: tuple) -> tuple[str, list[bytes]]:
        """(question, encoded images) of a request: (context, ..., doc_to_visual, doc_id, task,
        split). Images are re-encoded losslessly (PNG): the task's loader takes file bytes."""
        context, doc_to_visual, doc_id, task, split = args[0], *args[-4:]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        images = []
        for visual in flatten(visuals or []):
            if not isinstance(visual, Image.Image):
                raise ValueError(f"vlscale: {task} gives a {type(visual).__name__} visual; "
                                 "vlscale VLMs take images only (no video or audio)")  # fmt: skip
            buffer = io.BytesIO()
            visual.save(buffer, format="PNG")
            images.append(buffer.getvalue())
        return context, images

    def generation_options(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """lmms-eval's generation_kwargs -> (options for task.generate, stop strings)."""
        gen_kwargs = dict(gen_kwargs or {})
        ignored = sorted(set(gen_kwargs) - set(GENERATION_KEYS) - self._warned)
        if ignored:
            log.warning("vlscale: ignoring generation_kwargs %s (used: %s)", ignored,
                        ", ".join(GENERATION_KEYS))  # fmt: skip
            self._warned.update(ignored)
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0
        options = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": do_sample,
        }
        if do_sample:
            options["temperature"] = temperature
            options["top_p"] = float(gen_kwargs.get("top_p") or 1.0)
            options["top_k"] = int(gen_kwargs.get("top_k") or 0)
        if options["num_beams"] > 1 and "length_penalty" in gen_kwargs:
            options["length_penalty"] = float(gen_kwargs["length_penalty"])
        return options, until

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def flatten(visuals) -> list:
    out = []
    for visual in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        out += flatten(visual) if isinstance(visual, (list, tuple)) else [visual]
    return out
