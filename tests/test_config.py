import pytest
import yaml

from core.config import Config, ConfigError
from core.recipe import config_from_dict, load_config

MINIMAL = """
name: mini
model:
  vision_config: {model_type: siglip_vision_model, hidden_size: 32}
  text_config: {model_type: qwen3, hidden_size: 32}
  tokenizer: some/tokenizer
optim:
  lr: 1.0e-3
  max_steps: 10
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text(MINIMAL)
    return path


def test_recipe_loads_with_defaults_and_run_dir(recipe):
    cfg = load_config(recipe)
    assert cfg.name == "mini"
    assert cfg.run_dir == "runs/mini"
    assert cfg.optim.lr == 1e-3 and cfg.optim.max_steps == 10
    assert cfg.data.batch_size == 32  # default kept
    assert cfg.model.vision_config["hidden_size"] == 32


def test_overrides_coerce_types(recipe):
    cfg = load_config(
        recipe,
        [
            "optim.lr=3e-4",
            "optim.max_steps=7",
            "data.batch_size=4",
            "logging.wandb.mode=online",
            "engine.precision=fp32",
            "data.shuffle=false",
            "run_dir=/tmp/x",
            "resume=none",
            "optim.betas=[0.9, 0.99]",
            "model.text_config.num_hidden_layers=3",
            "optim.warmup_steps=0",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.max_steps == 7 and cfg.data.batch_size == 4
    assert cfg.logging.wandb.mode == "online"
    assert cfg.data.shuffle is False
    assert cfg.run_dir == "/tmp/x" and cfg.resume == "none"
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.model.text_config == {
        "model_type": "qwen3",
        "hidden_size": 32,
        "num_hidden_layers": 3,
    }


def test_int_given_for_float_is_accepted(recipe):
    assert load_config(recipe, ["optim.lr=1"]).optim.lr == 1.0


def test_unknown_key_names_valid_keys_and_closest(recipe):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["optim.lrr=1e-3"])
    msg = str(err.value)
    assert "optim.lrr" in msg and "did you mean 'optim.lr'" in msg
    assert "warmup_steps" in msg and "max_steps" in msg  # the valid keys are listed


def test_unknown_section_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + "\noptimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        load_config(path)


def test_unknown_nested_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + "\nlogging:\n  wandb:\n    mdoe: online\n")
    with pytest.raises(
        ConfigError, match=r"'logging\.wandb\.mdoe'.*did you mean 'logging\.wandb\.mode'"
    ):
        load_config(path)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.batch_size=abc", "data.batch_size: expected int, got 'abc'"),
        ("data.batch_size=2.5", "data.batch_size: expected int, got 2.5"),
        ("engine.precision=fp8", "engine.precision: expected 'fp32' | 'bf16', got 'fp8'"),
        ("data.shuffle=maybe", "data.shuffle: expected bool, got 'maybe'"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ],
)
def test_wrong_type_names_key_type_and_value(recipe, override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, [override])
    assert expected in str(err.value)


def test_base_inheritance_deep_merges(tmp_path, recipe):
    child = tmp_path / "child.yaml"
    child.write_text("base: mini.yaml\noptim:\n  max_steps: 99\ndata:\n  batch_size: 8\n")
    cfg = load_config(child)
    assert cfg.name == "child"
    assert cfg.optim.max_steps == 99 and cfg.optim.lr == 1e-3  # sibling key inherited
    assert cfg.data.batch_size == 8
    assert cfg.model.text_config["model_type"] == "qwen3"


def test_base_loop_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_resolved_config_round_trips_through_yaml(recipe):
    cfg = load_config(recipe, ["optim.lr=2e-4", "data.train=shards/train-{000000..000003}.tar"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert isinstance(again, Config)


def test_cross_field_validation(recipe):
    with pytest.raises(ConfigError, match="accum_steps"):
        load_config(recipe, ["optim.accum_steps=0"])


def test_unknown_recipe_name_lists_known():
    with pytest.raises(ConfigError, match="no recipe 'nope'"):
        load_config("nope")


def test_bad_override_syntax(recipe):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(recipe, ["optim.lr"])


# ---------------------------------------------------------------- a config per task kind


def test_task_kind_selects_its_sections(recipe):
    from core.tasks.siglip import ImageTextDataConfig, SigLIPConfig
    from core.tasks.vlm import VLMConfig, VLMDataConfig

    siglip = load_config(recipe)  # kind defaults to siglip: its sections, all defaults
    assert type(siglip.task) is SigLIPConfig and type(siglip.data) is ImageTextDataConfig
    vlm = load_config(recipe, ["task.kind=vlm", "task.stage=sft", "data.max_seq_len=64"])
    assert type(vlm.task) is VLMConfig and type(vlm.data) is VLMDataConfig
    assert vlm.task.stage == "sft" and vlm.data.max_seq_len == 64
    again = config_from_dict(yaml.safe_load(vlm.to_yaml()))
    assert again == vlm and type(again.task) is VLMConfig


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["task.stage=sft"], r"unknown key 'task.stage'.*belongs to task.kind vlm"),
        (["data.max_seq_len=64"], r"'data.max_seq_len' belongs to task.kind vlm"),
        (["task.kind=vlm", "task.embed_dim=8"], r"'task.embed_dim' belongs to task.kind siglip"),
        (["task.kind=vlm", "task.stage=2"], r"task.stage: expected 'align' \| 'sft', got 2"),
        # every registered kind, sorted (test files may register kinds of their own)
        (
            ["task.kind=nope"],
            r"'nope' is not a task; valid kinds: cappa, cells, paligemma, siglip, siglip2, "
            r"(\w+, )*vlm",
        ),
        (["engine.freeze=[vision]"], r"'engine.freeze' moved to task.freeze"),
        (["eval.zeroshot=false"], r"'eval.zeroshot' moved to eval.evaluators"),
        (["engine.kind=zero4"], r"'zero4' is not an engine; valid: ddp, zero2, zero3, fsdp"),
    ],
)
def test_keys_of_another_kind_or_moved_keys_say_where_they_belong(recipe, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(recipe, overrides)


def test_a_yaml_key_of_another_kind_is_an_error(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text(MINIMAL + "task:\n  kind: siglip\n  lm_tuning: lora\n")
    with pytest.raises(ConfigError, match=r"valid keys: kind, trainable, freeze, embed_dim"):
        load_config(path)


def test_evaluators_are_resolved_with_every_option(recipe):
    cfg = load_config(recipe, ["eval.evaluators=[retrieval, {zeroshot: {every: 50}}]"])
    assert cfg.eval.evaluators == [
        {"retrieval": {"every": 0, "ks": [1, 5, 10]}},
        {"zeroshot": {"every": 50, "classes": "shapes"}},
    ]


@pytest.mark.parametrize(
    "declared, expected",
    [
        ("[retrievl]", r"no evaluator 'retrievl'; valid: loss, retrieval, zeroshot, vqa"),
        ("[{retrieval: {k: [1]}}]", r"unknown key 'eval.evaluators.retrieval.k'.*'.*ks'"),
        ("[{zeroshot: {classes: imagenet}}]", r"zeroshot.classes='imagenet'; known: shapes"),
        ("[vqa]", r"'vqa' needs a task that is Generative.*task.kind=siglip is not"),
        ("[loss, loss]", r"'loss' is declared twice"),
        ("[[loss]]", r"expected a name or \{name: \{options\}\}"),
    ],
)
def test_bad_evaluator_declarations_are_clear_errors(recipe, declared, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(recipe, [f"eval.evaluators={declared}"])


def test_every_recipe_loads(tmp_path):
    from core.config import RECIPES_DIR

    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.eval.evaluators, f"{path.name} declares no evaluators"
