"""The task contract: everything the loop, the engines, the evaluators and the commands may rely
on. A new recipe is one YAML plus, when no existing kind fits, one task file like this:

    @dataclass
    class MyConfig(TaskConfig):          # the recipe's `task:` section for this kind
        heads: int = 1

    @register_task
    class MyTask(Task):
        kind = "mine"                     # task.kind: mine
        Config = MyConfig
        DataConfig = MyDataConfig         # optional: the `data:` fields only this kind reads

        def __init__(self, cfg): ...      # build modules (random init is seeded by the loop)
        def blocks(self): ...             # {"vision": self.vision.blocks}
        def train_stream(self, dist): ... # a ShardStream of batches
        def forward(self, batch): ...     # -> TaskOutput

What the loop does with a task (core/loop.py), and so what each method must guarantee:

1. `build_task(cfg)` calls `Kind(cfg)` with the same seed on every rank (identical initial
   weights), then applies the trainable patterns (`default_trainable()`, or the recipe's
   `task.trainable`, minus `task.freeze`): parameters that do not match get requires_grad=False,
   no gradients and no optimizer state. It is the one freezing mechanism.
2. The engine wraps the task. It applies activation checkpointing and compile to, and shards
   (FSDP2: one unit per block), exactly the blocks that `blocks()` declares; a tower none of
   whose parameters train is sharded as one unit.
3. Each optimizer step takes `optim.accum_steps` micro-batches per rank. Before any forward the
   loop sums `loss_weight(batch)` over them and over ranks (one all-reduce): the step's gradient
   is that of sum(forward(batch).loss) / that total. So `forward` returns the *sum* of its
   per-unit losses and `loss_weight` how many units it summed: supervised tokens for an LM (every
   token of the global batch counts equally, whatever the packing), or 1 (the default) for a
   loss that is already a mean over its micro-batch (then micro-batches count equally). The
   weight is read from the batch before the forward because the total must be known before the
   first backward; the loop logs sum(loss) / total, the honest mean.
4. Under zero3 and fsdp parameters are gathered module by module collectively: every rank must
   run the same modules in the same order on every micro-batch, whatever its batch holds.
5. Evaluators (core/evaluators/) get the task in eval mode (under zero3 and fsdp still sharded:
   4. holds for every method they call) and use only this contract: `val_stream` for the loss,
   and the capability mixins below for the rest.

Optional capabilities are declared by inheriting a mixin (never probed with hasattr):
`ImageEncoder` (linear probes), `ImageTextEmbedder` (retrieval, zero-shot; an ImageEncoder),
`Captioner` (captioning, scoring classifier), `Generative` (VQA, generation samples, `vlscale
generate`), `PreferenceScorer` (the preference evaluator). `export_hf` (`vlscale export`) has
a default that writes nothing beyond the full state dict, which the command always writes; each
directory it writes should load in transformers alone (core/export.py: tokenizer, image
processor and generation config helpers). `model_card` adds the kind's tags and notes to the
export's README.md.
"""

from __future__ import annotations

import fnmatch
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from .. import deferred_init, lazy_tensors
from ..config import Config, ConfigError, DataConfig, TaskConfig
from ..flops import TowerCost


class TaskOutput(NamedTuple):
    """What `Task.forward` returns for one micro-batch. A NamedTuple because the engines' module
    hooks (FSDP2's pytree, ZeRO-3's output hooks) must see the tensors inside it."""

    loss: torch.Tensor  # the sum of per-unit losses; `loss_weight(batch)` units (see above)
    samples: int | torch.Tensor = 0  # samples in this micro-batch (throughput)
    tokens: int | torch.Tensor = 0  # tokens processed (throughput)
    metrics: Mapping[str, Any] = MappingProxyType({})  # scalars, logged as they are


class Task(nn.Module, ABC):
    """A model and its objective. Subclasses set `kind` and `Config` (and `DataConfig` when they
    read data fields of their own), and implement the abstract methods."""

    kind: ClassVar[str]
    rebuilt_digest: str = ""  # set by build_task (see rebuilt_prefixes)
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    DataConfig: ClassVar[type[DataConfig]] = DataConfig

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    # ------------------------------------------------------------------ what it builds
    @abstractmethod
    def blocks(self) -> dict[str, nn.ModuleList]:
        """Submodule name (as in named_modules) -> its transformer blocks: the units engines
        shard, activation-checkpoint and compile."""

    def tokens_per_sample(self) -> dict[str, int]:
        """Each `blocks()` tower's sequence length for one sample at the configured sizes (the
        most a sample may have): what `vlscale plan` sizes activations with."""
        raise NotImplementedError(f"task.kind={self.kind} does not declare tokens_per_sample")

    def keeps_activations(self) -> dict[str, bool]:
        """Each `blocks()` tower -> whether backward needs its activations: its parameters train,
        or something before it does (its input needs a gradient). A frozen tower with nothing
        trained upstream keeps none (`vlscale plan`). The default: each tower reads the data
        (its own parameters decide); tasks whose towers feed one another override it."""
        return {name: any(p.requires_grad for p in self.get_submodule(name).parameters())
                for name in self.blocks()}  # fmt: skip

    def logits_per_sample(self) -> tuple[int, int]:
        """(positions, vocabulary) of the LM-head logits one sample computes at most, whose
        log-probabilities the loss keeps for backward (`vlscale plan`); (0, 0): no LM head."""
        return 0, 0

    def default_trainable(self) -> list[str]:
        """Parameter-name patterns trained unless the recipe sets `task.trainable`."""
        return ["*"]

    def rebuilt_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of frozen auxiliary weights the task rebuilds whenever it is built
        (from `task.init_from`), that are no part of the trained model: stage 4's frozen
        reference copy. Checkpoints and exports leave them out (a second copy of the model on
        disk per checkpoint, for nothing); resuming keeps the built ones, and refuses to when
        they differ from those the run started with (`rebuilt_digest`, set by build_task)."""
        return ()

    def check_config(self) -> None:  # noqa: B027 - optional hook
        """Cross-field checks of this kind's config (raise ConfigError)."""

    # ------------------------------------------------------------------ data and objective
    @abstractmethod
    def train_stream(self, dist):
        """The training batches of this rank (a resumable ShardStream)."""

    def val_stream(self, dist, batch_size: int, subsets: list[str] | None = None):
        """The validation split decoded as training batches, once (the loss evaluator's).
        `subsets`: where data.val has a `{subset}` pattern, the subsets to read (default: the
        training mixture's; `val_mixture` in core/tasks/common.py)."""
        raise ConfigError(f"task.kind={self.kind} has no validation stream")

    @abstractmethod
    def forward(self, batch: dict) -> TaskOutput:
        """One micro-batch -> the sum of its losses (see `loss_weight`) and metrics."""

    def loss_weight(self, batch: dict) -> float:
        """How many units `forward(batch).loss` sums over (read before the forward)."""
        return 1.0

    def tower_costs(self) -> dict[str, TowerCost]:
        """What its FLOPs depend on (core/flops.py), read once by `build_task` after the
        trainable patterns are set and before an engine shards anything. {}: not counted."""
        return {}

    def flops(self, batch: dict) -> float:
        """Model FLOPs of training on this host-side micro-batch (forward + backward, real
        tokens only; core/flops.py), from `self.costs`. 0: not counted (no MFU logged)."""
        return 0.0

    # ------------------------------------------------------------------ results
    def export_hf(self, out: Path, state: dict[str, torch.Tensor]) -> None:  # noqa: B027
        """Write the task's towers in Hugging Face layout under `out` (`vlscale export`)."""

    def model_card(self) -> dict[str, Any]:
        """What the export's model card (OUT/README.md, core/export.py) says of this kind beyond
        what it finds in OUT: {"tags": [Hub tags], "notes": markdown (how the parts fit)}."""
        return {}


class ImageEncoder(ABC):
    """Capability: the image tower's own features (linear probes compare every kind's tower on
    one scale)."""

    @abstractmethod
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, d]: the image tower's output tokens mean-pooled (CLS excluded), before any
        projection or normalisation: what the tower itself knows."""

    @abstractmethod
    def preprocess_image(self, data: bytes) -> torch.Tensor:
        """An encoded image file (JPEG, PNG, WebP) -> its pixel_values [3, H, W], exactly as
        validation images are (benchmark datasets outside the recipe's data)."""


class ImageTextEmbedder(ImageEncoder):
    """Capability: L2-normalised image and text embeddings in one space (retrieval, zero-shot).
    `val_stream` batches carry pixel_values, input_ids, attention_mask, key and attributes."""

    @abstractmethod
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor: ...

    @abstractmethod
    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of free texts (class prompts), exactly as captions are."""


class Captioner(ABC):
    """Capability: a text decoder conditioned on the image (captioning, the scoring classifier).
    `val_stream` batches carry pixel_values, key, attributes (the sample's JSON metadata or
    None) and caption (the reference text)."""

    @abstractmethod
    def caption(self, pixel_values: torch.Tensor, max_new_tokens: int) -> list[str]:
        """Greedy captions of the images, decoded (special tokens removed)."""

    @abstractmethod
    def score_texts(self, pixel_values: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """[n_images, n_texts] float: log p(text | image) of each text as a caption, summed
        over its tokens (EOS included), as the decoder is trained (big_vision's scoring
        classifier)."""


class Generative(ABC):
    """Capability: answers questions about images (VQA evaluation, generation samples,
    `vlscale generate`)."""

    @abstractmethod
    def prompt_stream(self, dist, batch_size: int, subsets: list[str], data: str = ""):
        """This rank's share of the validation questions, once: batches of prompts ready for
        `generate`, plus `key`, `source` (subset) and `answer` (reference) lists, and
        optionally `answers` (every accepted answer of each question, for the `vqa` metrics).
        `data`: a shard pattern of VQA samples in the layout of the kind's SFT data (FineVision
        for the VLM) to ask instead of data.val: e.g. stage 2's questions asked after stage 3 or
        4, whose own data are chains of thought or preference pairs."""

    @abstractmethod
    def prompt_batch(self, items: list[tuple[str, list[bytes]]]) -> dict:
        """(question, encoded images) pairs -> one batch for `generate`."""

    @abstractmethod
    def generate(self, batch: dict, max_new_tokens: int, **options) -> list[str]:
        """Decoded answers; `options` are core.models.generation.GenerationConfig fields."""

    def answer_format(self) -> str:
        """The chain-of-thought format the task trains its answers in (core/data/cot.py:
        think | llava_cot; the `cot` and `vqa` evaluators extract answers from it), "" when
        it answers directly."""
        return ""


class PreferenceScorer(ABC):
    """Capability: ranks the two responses of a preference pair by the implicit reward of
    preference optimisation (the `preference` evaluator). `val_stream` batches are pairs and
    carry `pair_keys` (one unique name per pair, in batch order)."""

    @abstractmethod
    def pair_rewards(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) implicit rewards [P] of the batch's pairs: beta x (policy log-prob
        - reference log-prob) of each response, as the training loss defines them."""


# ---------------------------------------------------------------------------- registry

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: `task.kind: <cls.kind>` builds `cls`. A test or a plugin may register
    its own kind without changing core/."""
    if not issubclass(cls.Config, TaskConfig) or not issubclass(cls.DataConfig, DataConfig):
        raise TypeError(f"{cls.__name__}: Config/DataConfig must extend TaskConfig/DataConfig")
    TASKS[cls.kind] = cls
    return cls


def task_class(kind: str) -> type[Task]:
    if kind not in TASKS:
        valid = ", ".join(sorted(TASKS))
        raise ConfigError(f"task.kind={kind!r} is not a task; valid kinds: {valid}")
    return TASKS[kind]


def build_task(cfg: Config) -> Task:
    """The recipe's task, with its trainable parameters set (see the module docstring)."""
    with deferred_init.build() as deferred:  # under fsdp: nothing materialised (the module)
        task = task_class(cfg.task.kind)(cfg)
    task.check_config()
    set_trainable(task, cfg.task.trainable or task.default_trainable(), cfg.task.freeze)
    task.costs = task.tower_costs()
    task.rebuilt_digest = rebuilt_digest(task, deferred)
    if deferred is not None:
        deferred_init.hand_out(task, deferred, lazy_tensors.active())
    return task


def rebuilt_digest(task: Task, deferred: deferred_init.DeferredInit | None = None) -> str:
    """sha256 of the tensors under `rebuilt_prefixes` as built ("" when none; a task on the meta
    device has no values to hash): checkpoints record it, a resume compares it. A deferred build
    (fsdp) must have materialised them (deferred_init.materialize, as stage 4's copy does)."""
    prefixes = task.rebuilt_prefixes()
    if not prefixes:
        return ""
    digest = hashlib.sha256()
    for name, tensor in sorted(task.state_dict(keep_vars=True).items()):
        if name.startswith(prefixes):
            if deferred is not None and deferred.is_deferred(tensor):
                raise RuntimeError(
                    f"{name}: a weight the task rebuilds (rebuilt_prefixes) is still deferred "
                    "after the build: call core.deferred_init.materialize on it where it is built"
                )
            if tensor.is_meta:
                return ""
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def set_trainable(model: nn.Module, trainable: list[str], freeze: list[str]) -> None:
    """requires_grad = the name matches a `trainable` pattern and no `freeze` pattern. A pattern
    that matches nothing is an error (a typo would silently train or freeze the wrong thing)."""
    names = [name for name, _ in model.named_parameters()]
    for key, patterns in (("task.trainable", trainable), ("task.freeze", freeze)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                tops = sorted({n.split(".")[0] for n in names})
                raise ConfigError(
                    f"{key}: {pattern!r} matches no parameter; names start with "
                    f"{', '.join(t + '.' for t in tops)} (e.g. {names[0]!r})"
                )
    for name, param in model.named_parameters():
        train = any(fnmatch.fnmatchcase(name, p) for p in trainable)
        param.requires_grad_(train and not any(fnmatch.fnmatchcase(name, p) for p in freeze))
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"task.trainable={trainable} minus task.freeze={freeze} trains nothing")
