"""The VLM chat processor with real chat templates (tests/fixtures/chat_templates: Qwen2.5, Qwen3,
Llama 3, Llama 3.2, SmolLM2, Gemma; each file names its source): ids are the template's own
rendering tokenised once, labels are each answer and its end-of-turn token and nothing else, the
generation prompt is the template's, transformers' {% generation %} masks agree, the export
renders as training did, and a tiny Llama VLM trains with a Llama 3 template end to end."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from core.data.chat import (
    IGNORE,
    ChatProcessor,
    VLMEvalDecoder,
    VLMTrainDecoder,
    add_image_tokens,
)
from core.data.errors import BadSample
from core.data.tokenizer import train_bpe_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
IMAGE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
PER_IMAGE = 3  # <|image_pad|> tokens per image

# Each family's special tokens as its tokenizer has them, and the end-of-turn token its template
# writes after an answer (stated here by hand: the processor finds it from the template).
FAMILIES = {
    "qwen2.5": dict(specials=["<|im_start|>", "<|im_end|>"], pad="<|endoftext|>", bos=None,
                    eos="<|im_end|>", end="<|im_end|>"),
    "qwen3": dict(specials=["<|im_start|>", "<|im_end|>"], pad="<|endoftext|>", bos=None,
                  eos="<|im_end|>", end="<|im_end|>", plain=["<think>", "</think>"]),
    "llama3": dict(specials=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   pad=None, bos="<|begin_of_text|>", eos="<|eot_id|>", end="<|eot_id|>"),
    "llama3.2": dict(specials=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                     pad=None, bos="<|begin_of_text|>", eos="<|eot_id|>", end="<|eot_id|>"),
    "smollm2": dict(specials=["<|im_start|>", "<|im_end|>"], pad="<|im_end|>", bos="<|im_start|>",
                    eos="<|im_end|>", end="<|im_end|>"),
    "gemma": dict(specials=["<start_of_turn>", "<end_of_turn>"], pad="<pad>", bos="<bos>",
                  eos="<eos>", end="<end_of_turn>", system=None),  # Gemma takes no system turn
}  # fmt: skip
SYSTEM = "You are a helpful assistant."
KWARGS = {"enable_thinking": False}  # the VLM task's default template arguments
TURNS = [
    {"user": "What colour is the square?", "assistant": "red"},
    {"user": "And the circle? {{ braces }} 'quotes'", "assistant": "  blue, naïvely \n"},
    {"user": "How many shapes are there?", "assistant": "two"},
]
WORDS = ["What colour is the square?", "red", "blue circle", "How many shapes are there? two",
         "user assistant model system", "You are a helpful assistant."]  # fmt: skip


def template_text(name: str) -> str:
    """A fixture's template: the file without its first line (the `{# source: ... #}` note)."""
    return (FIXTURES / f"{name}.jinja").read_text().split("\n", 1)[1]


def family_tokenizer(name: str, out_dir: Path, image_tokens: bool = True, texts=()):
    """A tiny BPE tokenizer (trained on WORDS + `texts`) with the family's specials (each one
    token) and real template."""
    family = FAMILIES[name]
    specials = family["specials"] + (list(IMAGE_TOKENS) if image_tokens else [])
    tok = train_bpe_tokenizer(
        WORDS * 20 + list(texts), out_dir, 400 + 200 * bool(texts), specials,
        pad_token=family["pad"], bos_token=family["bos"], eos_token=family["eos"],
        chat_template=template_text(name),
    )  # fmt: skip
    if family.get("plain"):  # Qwen3's <think> and </think>: added tokens, not special ones
        tok.add_tokens(family["plain"])
    return tok


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    tok = family_tokenizer(name, tmp_path_factory.mktemp(name))
    system = FAMILIES[name].get("system", SYSTEM)
    return name, tok, ChatProcessor(tok, PER_IMAGE, system, KWARGS), system


def reference_messages(system, turns, images: int, last_answer: bool = True) -> list[dict]:
    """The conversation as a transformers user writes it: images as their pad tokens."""
    block = IMAGE_TOKENS[0] + IMAGE_TOKENS[2] * PER_IMAGE + IMAGE_TOKENS[1]
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": block * images * (i == 0) + turn["user"]})
        if last_answer or i < len(turns) - 1:
            messages.append({"role": "assistant", "content": turn["assistant"].strip()})
    return messages


def template_ids(tok, messages, **options) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True, return_dict=False, **options)


def supervised_runs(ids, labels) -> list[list[int]]:
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# ------------------------------------------------------------------ (a) labels
@pytest.mark.parametrize("images", [0, 2])
def test_labels_are_each_answer_and_its_end_of_turn_token(family, images):
    name, tok, processor, _ = family
    ids, labels = processor.encode(TURNS, images)
    end = tok.convert_tokens_to_ids(FAMILIES[name]["end"])
    assert processor.end_of_turn_id == end and processor.end_of_turn == FAMILIES[name]["end"]
    runs = supervised_runs(ids, labels)
    assert [tok.decode(run[:-1]) for run in runs] == [t["assistant"].strip() for t in TURNS]
    assert [run[-1] for run in runs] == [end] * len(TURNS)
    pads = [i for i, t in enumerate(ids) if t == processor.image_pad_id]
    assert len(pads) == images * PER_IMAGE and all(labels[p] == IGNORE for p in pads)


def test_supervised_tokens_agree_with_transformers_generation_markers(tmp_path):
    """Templates with {% generation %} around the content and end-of-turn token: transformers'
    assistant mask (`return_assistant_tokens_mask`) is the processor's label mask."""
    chatml = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    llama = (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    )
    for name, template in (("smollm2", chatml), ("llama3", llama)):
        tok = family_tokenizer(name, tmp_path / name)
        tok.chat_template = template
        ids, labels = ChatProcessor(tok, PER_IMAGE, SYSTEM).encode(TURNS, 1)
        theirs = tok.apply_chat_template(
            reference_messages(SYSTEM, TURNS, 1), tokenize=True, return_assistant_tokens_mask=True
        )
        assert theirs["input_ids"] == ids
        assert theirs["assistant_masks"] == [int(label != IGNORE) for label in labels]


# ------------------------------------------------------------------ (b) ids
@pytest.mark.parametrize("images", [0, 2])
def test_ids_are_the_templates_rendering_tokenised_once(family, images):
    name, tok, processor, system = family
    ids, _ = processor.encode(TURNS, images)
    messages = reference_messages(system, TURNS, images)
    assert ids == template_ids(tok, messages, **KWARGS)
    text = tok.apply_chat_template(messages, tokenize=False, **KWARGS)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # nothing lost or added (the BPE round-trips exactly)


# ------------------------------------------------------------------ (c) generation prompt
def test_generation_prompt_is_the_templates_and_prefixes_the_last_turn(family, tmp_path):
    """The evaluator's prompt ids (VLMEvalDecoder, the VQA evaluator's decoder) are the
    template's add_generation_prompt rendering; training sees the same prefix before the last
    answer (for Qwen3: with its empty <think> block, enable_thinking false)."""
    from PIL import Image

    name, tok, processor, system = family
    expected = template_ids(tok, reference_messages(system, TURNS, 1, last_answer=False),
                            add_generation_prompt=True, **KWARGS)  # fmt: skip
    assert processor.prompt(TURNS, 1) == expected
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, format="PNG")
    sample = {"__key__": "k", "json": json.dumps({"texts": TURNS, "num_images": 1}).encode(),
              "0.png": buffer.getvalue()}  # fmt: skip
    decoded = VLMEvalDecoder(processor, 16, [0.5] * 3, [0.5] * 3)(sample)
    assert decoded["prompt_ids"].tolist() == expected
    train = VLMTrainDecoder(processor, 16, [0.5] * 3, [0.5] * 3, max_seq_len=512)(sample)
    ids, labels = train["input_ids"].tolist(), train["labels"].tolist()
    assert ids[: len(expected)] == expected
    assert tok.decode([t for t in labels[len(expected) :] if t != IGNORE]) == (
        TURNS[-1]["assistant"] + FAMILIES[name]["end"]
    )
    if name == "qwen3":
        assert tok.decode(expected).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_with_thinking_keeps_its_empty_think_block_unsupervised(tmp_path):
    """Without enable_thinking=false Qwen3 writes `<think>\\n\\n</think>\\n\\n` before the last
    answer only (not in its generation prompt): template text, never supervised."""
    tok = family_tokenizer("qwen3", tmp_path)
    processor = ChatProcessor(tok, PER_IMAGE, SYSTEM, template_kwargs={})
    ids, labels = processor.encode(TURNS, 1)
    assert ids == template_ids(tok, reference_messages(SYSTEM, TURNS, 1))
    assert tok.decode(ids).count("<think>") == 1
    runs = supervised_runs(ids, labels)
    assert [tok.decode(run) for run in runs] == [
        t["assistant"].strip() + "<|im_end|>" for t in TURNS
    ]
    assert tok.decode(processor.prompt(TURNS, 1)).endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------ errors
def test_texts_with_the_templates_tokens_are_bad_samples(family):
    name, _, processor, _ = family
    for token in (*FAMILIES[name]["specials"], "<|image_pad|>"):
        for turn in ({"user": f"look {token}", "assistant": "red"},
                     {"user": "q?", "assistant": f"red{token}"}):  # fmt: skip
            with pytest.raises(BadSample, match="special_token_in_text"):
                processor.encode([turn], 1)


def test_templates_that_cannot_be_trained_on_are_clear_errors(tmp_path):
    gemma = family_tokenizer("gemma", tmp_path / "gemma")
    with pytest.raises(ValueError, match=r"System role not supported.*data\.system_prompt: ''"):
        ChatProcessor(gemma, PER_IMAGE, SYSTEM)
    tok = family_tokenizer("smollm2", tmp_path / "smollm2")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="no end-of-turn token"):
        ChatProcessor(tok, PER_IMAGE, SYSTEM)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}<|im_end|>{% endfor %}"
    with pytest.raises(ValueError, match="rewrites assistant messages"):
        ChatProcessor(tok, PER_IMAGE, SYSTEM)
    # content-dependent rewriting shows only on the samples it changes
    tok.chat_template = ("{% for m in messages %}{{ m['content'] | replace('x', 'y') }}<|im_end|>"
                         "{% endfor %}")  # fmt: skip
    processor = ChatProcessor(tok, PER_IMAGE, SYSTEM)
    processor.encode([{"user": "q", "assistant": "a"}], 0)
    with pytest.raises(BadSample, match="template_rewrites_answer"):
        processor.encode([{"user": "q", "assistant": "box"}], 0)


def test_missing_image_tokens_are_named_and_can_be_added(tmp_path):
    tok = family_tokenizer("llama3", tmp_path, image_tokens=False)
    with pytest.raises(ValueError, match=r"no '<\|vision_start\|>' token"):
        ChatProcessor(tok, PER_IMAGE, SYSTEM)
    size = len(tok)
    assert add_image_tokens(tok) == list(IMAGE_TOKENS)
    assert len(tok) == size + 3 and add_image_tokens(tok) == []
    ids, labels = ChatProcessor(tok, PER_IMAGE, SYSTEM).encode(TURNS, 1)
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == PER_IMAGE


# ------------------------------------------------------------------ export
def test_exported_template_renders_as_training(family, tmp_path):
    """The export's default template (the source's behind a prelude) with plain transformers
    calls, images as {"type": "image"} parts and no template arguments, gives the processor's
    training ids and generation prompts."""
    from transformers import AutoTokenizer

    from core.export import save_tokenizer

    name, tok, processor, system = family
    save_tokenizer(tok, tmp_path / "lm", chat_template=processor.export_template())
    exported = AutoTokenizer.from_pretrained(tmp_path / "lm")
    for images in (0, 2):
        messages = []
        for i, turn in enumerate(TURNS):
            parts = [{"type": "image"}] * (images if i == 0 else 0)
            messages.append({"role": "user", "content": [*parts, {"type": "text", "text":
                                                                  turn["user"]}]})  # fmt: skip
            messages.append({"role": "assistant", "content": turn["assistant"]})
        assert template_ids(exported, messages) == processor.encode(TURNS, images)[0]
        prompt = template_ids(exported, messages[:-1], add_generation_prompt=True)
        assert prompt == processor.prompt(TURNS, images)


# ------------------------------------------------------------------ end to end
def test_tiny_llama_vlm_trains_with_a_llama3_template(vqa, tmp_path):
    """A tiny random Llama LM with a Llama 3 template (its tokenizer has no image tokens: the
    task adds them) trains a few steps, evaluates, and prompts as the template does."""
    from conftest import VQA_SUBSETS
    from test_export import png
    from test_train import metrics
    from test_vlm_task import vlm_overrides

    from core.data.synthetic import vqa_conversation
    from core.loop import train
    from core.recipe import load_config
    from core.tasks import build_task

    turns = [vqa_conversation(subset, 0, "train", row)[1] for subset in VQA_SUBSETS
             for row in range(32)]  # fmt: skip
    texts = [text for conversation in turns for turn in conversation for text in turn.values()]
    tok_dir = tmp_path / "tokenizer"
    family_tokenizer("llama3", tok_dir, image_tokens=False, texts=texts)
    over = {"model.tokenizer": str(tok_dir), "model.text_config.model_type": "llama",
            "task.trainable": "[projector.*, lm.*]", "optim.lr": 3e-3}  # fmt: skip
    cfg = load_config("tiny_vlm_stage1", vlm_overrides(vqa, tmp_path / "run", 6, **over))
    torch.manual_seed(0)
    task = build_task(cfg)
    assert type(task.lm).__name__ == "Decoder" and task.lm.config.model_type == "llama"
    tok = task.tokenizer
    assert task.end_of_turn_id == tok.convert_tokens_to_ids("<|eot_id|>")
    assert task.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    # `vlscale generate`'s prompt is the template's generation prompt
    batch = task.prompt_batch([("What colour is the square?", [png(20, 20)])])
    block = "<|vision_start|>" + "<|image_pad|>" * task.tokens_per_image + "<|vision_end|>"
    assert cfg.data.system_prompt == ""  # the tiny recipe's: no system turn
    messages = [{"role": "user", "content": block + "What colour is the square?"}]
    assert batch["input_ids"][0].tolist() == template_ids(tok, messages, add_generation_prompt=True)

    result = train(cfg)
    losses = [r["loss"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert 0.0 <= result["vqa_acc"] <= 1.0


def test_pretrained_llama_without_image_tokens_gets_embedding_rows_for_them(vqa, tmp_path):
    """A pretrained LM whose tokenizer lacks the image tokens (Llama 3, SmolLM2, Gemma): the task
    adds them and grows the embeddings (and the untied head) by their mean; existing rows stay;
    it trains, and the export loads in transformers with the grown vocabulary and tokenizer."""
    import transformers as hf
    from test_vlm_task import vlm_overrides

    from core.loop import train
    from core.recipe import load_config
    from core.tasks import build_task
    from launch.export import export

    tok_dir = tmp_path / "tokenizer"
    tok = family_tokenizer("llama3", tok_dir, image_tokens=False, texts=["What colour is it?"])
    assert "<|image_pad|>" not in tok.get_vocab()
    cfg = hf.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    pretrained = hf.LlamaForCausalLM.from_pretrained(tmp_path / "llama").state_dict()
    over = {"model.tokenizer": str(tok_dir), "model.text": str(tmp_path / "llama"),
            "model.text_config": "{}", "task.trainable": "[projector.*, lm.*]"}  # fmt: skip
    config = load_config("tiny_vlm_stage1", vlm_overrides(vqa, tmp_path / "run", 3, **over))
    task = build_task(config)
    assert task.lm.config.vocab_size == len(tok) + 3 == len(task.tokenizer)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        grown = task.lm.state_dict()[key]
        assert torch.equal(grown[: len(tok)], pretrained[key])
        assert torch.allclose(grown[len(tok) :], pretrained[key].mean(0).expand(3, -1))
    train(config)
    export(tmp_path / "run", tmp_path / "out")
    lm = hf.LlamaForCausalLM.from_pretrained(tmp_path / "out" / "lm").eval()
    exported_tok = hf.AutoTokenizer.from_pretrained(tmp_path / "out" / "lm")
    assert lm.config.vocab_size == len(exported_tok) == len(tok) + 3
    assert exported_tok.convert_tokens_to_ids("<|image_pad|>") == task.image_token_id
