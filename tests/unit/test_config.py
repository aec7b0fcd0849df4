"""Config loading: YAML into typed dataclasses, dotted overrides, and one clear UserError per mistake."""

from __future__ import annotations

import os

import pytest
import yaml

from rlhf.config import ArchitectureConfig, SFTConfig, load_config, save_config
from rlhf.errors import UserError

# A complete, valid SFT config; each test breaks one thing.
VALID = {
    "output_dir": "runs/test",
    "model": {"from_config": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}, "tokenizer": "tok"},
    "data": {"path": "train.jsonl", "max_length": 64},
    "training": {"batch_size": 8, "lr": 3e-3, "lr_scheduler": "constant"},
}


def write_yaml(tmp_path, content, name="config.yaml") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content), encoding="utf-8")
    return str(path)


def load_error(tmp_path, content=VALID, overrides=()) -> str:
    with pytest.raises(UserError) as caught:
        load_config(SFTConfig, write_yaml(tmp_path, content), list(overrides))
    message = str(caught.value)
    assert "\n" not in message  # the CLI prints it as one line
    return message


def test_yaml_loads_into_typed_blocks(tmp_path):
    config = load_config(SFTConfig, write_yaml(tmp_path, VALID))
    assert isinstance(config, SFTConfig)
    assert config.model.from_config == ArchitectureConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    assert config.model.tokenizer == "tok" and config.model.name_or_path is None
    assert config.data.max_length == 64 and config.data.path == "train.jsonl"
    assert config.training.lr == 3e-3 and config.training.lr_scheduler == "constant"
    assert config.training.warmup_ratio == 0.0  # untouched fields keep their defaults


def test_dotted_overrides_parse_to_the_field_type(tmp_path):
    config = load_config(SFTConfig, write_yaml(tmp_path, VALID), [
        "training.lr=3e-5",  # YAML 1.1 reads "3e-5" as a string; the float field converts it
        "training.batch_size=4",
        "data.columns={prompt: q}",
        "training.max_grad_norm=null",
        "logging.report_to=[tensorboard]",
        "model.from_config.dropout=0.1",
        "data.train_on_prompt=true",
    ])
    assert config.training.lr == 3e-5 and type(config.training.lr) is float
    assert config.training.batch_size == 4 and type(config.training.batch_size) is int
    assert config.data.columns == {"prompt": "q"}
    assert config.training.max_grad_norm is None
    assert config.logging.report_to == ["tensorboard"]
    assert config.model.from_config.dropout == 0.1
    assert config.data.train_on_prompt is True


def test_override_without_file_starts_from_defaults():
    config = load_config(SFTConfig, None, ["model.name_or_path=gpt2", "data.path=d.jsonl", "training.lr=1"])
    assert config.model.name_or_path == "gpt2" and config.training.lr == 1.0


def test_unknown_key_suggests_the_closest_name(tmp_path):
    message = load_error(tmp_path, overrides=["training.lrr=1e-4"])
    assert "training.lrr" in message and "did you mean 'training.lr'" in message


def test_unknown_top_level_key_in_yaml(tmp_path):
    message = load_error(tmp_path, {**VALID, "trainin": {"lr": 1.0}})
    assert "'trainin'" in message and "did you mean 'training'" in message


@pytest.mark.parametrize("override, key, expected", [
    ("training.batch_size=four", "training.batch_size", "expected an integer"),
    ("training.batch_size=2.5", "training.batch_size", "expected an integer"),
    ("training.lr=fast", "training.lr", "expected a number"),
    ("data.train_on_prompt=maybe", "data.train_on_prompt", "expected true or false"),
    ("data.columns=[a, b]", "data.columns", "expected a mapping"),
    ("training=3", "training", "expected a mapping"),
])
def test_wrong_type_names_the_key_and_the_expected_type(tmp_path, override, key, expected):
    message = load_error(tmp_path, overrides=[override])
    assert key in message and expected in message


@pytest.mark.parametrize("override, key", [
    ("training.lr=-1", "training.lr"),
    ("training.batch_size=0", "training.batch_size"),
    ("data.eval_fraction=0.9", "data.eval_fraction"),
    ("training.num_epochs=0", "training.num_epochs"),
])
def test_out_of_range_names_the_key_and_the_range(tmp_path, override, key):
    message = load_error(tmp_path, overrides=[override])
    assert key in message and "out of range" in message


def test_bad_literal_choice_lists_the_choices_and_suggests(tmp_path):
    message = load_error(tmp_path, overrides=["training.lr_scheduler=cosin"])
    assert "training.lr_scheduler" in message and "'cosin'" in message
    assert "cosine, linear, constant" in message and "did you mean 'cosine'" in message


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="config file .*nope.yaml.* not found"):
        load_config(SFTConfig, missing)


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "training:\n  lr: [1, 2\n  batch_size: 3\n")
    with pytest.raises(UserError) as caught:
        load_config(SFTConfig, path)
    assert path in str(caught.value) and "not valid YAML" in str(caught.value) and "line" in str(caught.value)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(SFTConfig, write_yaml(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("model_block", [
    {"name_or_path": "gpt2", "from_config": {"n_layer": 1}, "tokenizer": "tok"},  # both
    {"tokenizer": "tok"},  # neither
])
def test_exactly_one_of_name_or_path_and_from_config(tmp_path, model_block):
    message = load_error(tmp_path, {**VALID, "model": model_block})
    assert "model: give exactly one of name_or_path" in message


def test_validate_reports_every_problem_at_once(tmp_path):
    message = load_error(tmp_path, overrides=[
        "training.lr=-1", "training.batch_size=0", "model.from_config.n_embd=31", "model.tokenizer=null",
        "data.path="])
    for key in ("training.lr", "training.batch_size", "model.from_config.n_embd", "model.tokenizer", "data.path"):
        assert key in message, key


def test_save_config_round_trip_relaunches_the_same_run(tmp_path):
    config = load_config(SFTConfig, write_yaml(tmp_path, VALID), [
        "training.lr=3e-5", "data.columns={prompt: q, response: a}", "training.max_grad_norm=null",
        "logging.report_to=[tensorboard]", "training.warmup_ratio=0.1"])
    saved = str(tmp_path / "run" / "config.yaml")
    (tmp_path / "run").mkdir()
    save_config(config, saved)
    assert load_config(SFTConfig, saved) == config
    # The saved file is complete: every block and field is written out, not only the overrides.
    written = yaml.safe_load(open(saved, encoding="utf-8"))
    assert set(written) == {"output_dir", "overwrite", "model", "data", "training", "logging"}
    assert written["training"]["adam_beta2"] == 0.999


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
STAGE_CLASSES = {"sft": "SFTConfig", "rm": "RewardConfig", "ppo": "PPOConfig", "pipeline": "PipelineConfig"}


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".yaml")))
def test_every_shipped_config_loads(name):
    """Every YAML in configs/ (not the accelerate launch files) loads and validates as its stage's config."""
    import rlhf.config

    stage = name.removesuffix(".yaml").split("_")[0]
    assert stage in STAGE_CLASSES, f"configs/{name}: no stage config class known for '{stage}'"
    config_class = getattr(rlhf.config, STAGE_CLASSES[stage], None)
    if config_class is None:
        pytest.skip(f"rlhf.config has no {STAGE_CLASSES[stage]} yet")
    assert isinstance(load_config(config_class, os.path.join(CONFIGS_DIR, name)), config_class)


def test_flatten_gives_trackers_scalars_only():
    from rlhf.config import flatten

    flat = flatten({"training": {"lr": 1e-3, "max_steps": None}, "data": {"columns": {"prompt": "q"}, "path": "x"},
                    "logging": {"report_to": ["tensorboard"]}, "model": {"from_config": {}}})
    assert flat == {"training.lr": 1e-3, "training.max_steps": "None", "data.columns.prompt": "q", "data.path": "x",
                    "logging.report_to": "['tensorboard']", "model.from_config": "{}"}


def test_pipeline_skip_check_reads_a_saved_config_through_its_class(tmp_path):
    """A stage finished by an older version (its config.yaml lacks a key added since, at its default) is
    skipped; a changed value, or a file this version cannot read, runs the stage again."""
    from rlhf.config import RewardConfig, to_dict
    from rlhf.pipeline import run_stage

    ran = []

    class Trainer:
        def __init__(self, config):
            ran.append(config.overwrite)

        def train(self, resume):
            pass

    config = RewardConfig(output_dir=str(tmp_path))
    os.makedirs(tmp_path / "final")
    saved = to_dict(config)
    del saved["head_init"]  # written before the key existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert run_stage(Trainer, config, force=False) is False and ran == []
    config.training.lr = 1.0
    assert run_stage(Trainer, config, force=False) is True and ran == [True]
    config.training.lr = RewardConfig().training.lr
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**saved, "key_from_the_future": 1}))
    assert run_stage(Trainer, config, force=False) is True


# ----------------------------------------------------------------------------- --help and --print-config

ALL_CONFIGS = ("SFTConfig", "RewardConfig", "PPOConfig", "PipelineConfig")


def leaf_fields(config_class, prefix="", defaults=None):
    """(dotted key, field, default) of every non-block key, walked independently of rlhf.config's walker."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_class)
    defaults = defaults if defaults is not None else config_class()
    for f in dataclasses.fields(config_class):
        options = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        nested = next((a for a in options if dataclasses.is_dataclass(a)), None)
        if nested is None:
            yield prefix + f.name, f, getattr(defaults, f.name)
        else:
            yield from leaf_fields(nested, f"{prefix}{f.name}.", getattr(defaults, f.name))


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_help_lists_every_key_with_type_default_and_meaning(name):
    import rlhf.config as configs

    config_class = getattr(configs, name)
    text = configs.key_help(config_class)
    keys = list(leaf_fields(config_class))
    assert len(keys) > 20
    for key, f, default in keys:
        assert f.metadata["help"], f"{key} has no help text"
        line = next((line for line in text.splitlines() if line.strip().startswith(f"{key}  (")), None)
        assert line is not None, f"{key} missing from --help"
        assert f"default: {configs.yaml_value(default)})" in line, line
        first_words = " ".join(f.metadata["help"].split()[:4])
        assert first_words in " ".join(text.split()), f"{key}: help text missing"
    # Types as a user reads them.
    if name == "SFTConfig":
        assert "training.lr  (float, default: 5.0e-05)" in text
        assert "training.lr_scheduler  (one of cosine | linear | constant, default: cosine)" in text
        assert "training.max_steps  (int or null, default: null)" in text
        assert "model.from_config.n_layer  (int, default: 4)" in text  # keys of a null optional block too
        assert "data.columns  (mapping of str to str, default: {})" in text


def test_pipeline_help_points_stage_blocks_to_the_stage_help():
    import rlhf.config as configs
    from rlhf.cli import PIPELINE_STAGE_BLOCKS

    text = configs.key_help(configs.PipelineConfig, PIPELINE_STAGE_BLOCKS)
    assert "every key of `rlhf rm --help`, written rm.<key>" in text
    assert "rm.training.lr" not in text  # not repeated three times over
    assert "evaluation.samples_per_prompt  (int, default: 1)" in text


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_commented_yaml_of_the_defaults_loads_back_unchanged(name):
    import rlhf.config as configs

    config_class = getattr(configs, name)
    text = configs.to_commented_yaml(config_class(), header="a header\nof two lines")
    assert text.startswith("# a header\n# of two lines\n")
    assert configs.from_dict(config_class, yaml.safe_load(text), "printed") == config_class()
    for key, f, _ in leaf_fields(config_class):
        if ".from_config." not in key:
            assert f"{key.rsplit('.', 1)[-1]}:" in text, key


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".yaml")))
def test_commented_yaml_of_every_shipped_config_with_overrides_loads_back(name, tmp_path):
    import rlhf.config as configs

    config_class = getattr(configs, STAGE_CLASSES[name.removesuffix(".yaml").split("_")[0]])
    path = os.path.join(CONFIGS_DIR, name)
    overrides = ["output_dir=runs/elsewhere", "seed=3"] if config_class is configs.PipelineConfig else [
        "output_dir=runs/elsewhere", "training.lr=3e-5", "logging.report_to=[tensorboard]"]
    expected = load_config(config_class, path, overrides)
    printed = write_yaml(tmp_path, configs.to_commented_yaml(configs.resolve_config(config_class, path, overrides)))
    assert load_config(config_class, printed) == expected


def test_commented_yaml_keeps_awkward_strings():
    import rlhf.config as configs

    config = configs.RewardConfig()
    config.data.assistant_marker = "\n\nAssistant: 'quoted' #not a comment"
    config.data.columns = {"prompt": "yes", "chosen": "null"}  # YAML would read these bare as true / None
    config.output_dir = "runs/a: b"
    text = configs.to_commented_yaml(config)
    assert configs.from_dict(configs.RewardConfig, yaml.safe_load(text), "printed") == config


def test_resolve_config_checks_keys_and_types_but_not_cross_field_rules():
    import rlhf.config as configs

    config = configs.resolve_config(SFTConfig, None, ["training.lr=1e-3"])  # no model, no data: fine here
    assert config.training.lr == 1e-3 and config.data.path == ""
    with pytest.raises(UserError, match="unknown key 'training.lrr'"):
        configs.resolve_config(SFTConfig, None, ["training.lrr=1e-3"])
    with pytest.raises(UserError, match="data.path: required"):
        load_config(SFTConfig, None, ["training.lr=1e-3"])


def test_bare_no_in_yaml_is_the_choice_no_not_a_boolean(tmp_path):
    """YAML 1.1 reads `mixed_precision: no` as false; for a field whose choices are words it means 'no'."""
    config = load_config(SFTConfig, write_yaml(tmp_path, "training:\n  mixed_precision: no\n"),
                         ["data.path=x", "model.name_or_path=m"])
    assert config.training.mixed_precision == "no"
    assert load_config(SFTConfig, None, ["data.path=x", "training.mixed_precision=no",
                                         "model.name_or_path=m"]).training.mixed_precision == "no"
    message = load_error(tmp_path, {**VALID, "training": {"lr_scheduler": False}})
    assert "training.lr_scheduler: 'False' is not one of cosine, linear, constant" in message



def test_packing_is_refused_where_batches_are_padded():
    from rlhf.config import PPOConfig

    with pytest.raises(UserError, match=r"training.packing: SFT only"):
        load_config(PPOConfig, "configs/ppo.yaml", ["training.packing=true"])


@pytest.mark.parametrize("stage,path", [("rm", "configs/rm.yaml"), ("ppo", "configs/ppo.yaml")])
def test_fused_cross_entropy_is_sft_only(stage, path):
    from rlhf.config import PPOConfig, RewardConfig

    config_class = {"rm": RewardConfig, "ppo": PPOConfig}[stage]
    with pytest.raises(UserError, match=r"training.fused_cross_entropy: SFT only"):
        load_config(config_class, path, ["training.fused_cross_entropy=true"])
    assert load_config(SFTConfig, "configs/sft.yaml", ["training.fused_cross_entropy=true"]).training.fused_cross_entropy


@pytest.mark.parametrize("prefix_sharing", ["true", "false"])
def test_packing_is_accepted_for_the_reward_model(prefix_sharing):
    from rlhf.config import RewardConfig

    config = load_config(RewardConfig, "configs/rm.yaml", ["training.packing=true", f"prefix_sharing={prefix_sharing}"])
    assert config.training.packing and config.prefix_sharing == (prefix_sharing == "true")


def test_prefix_sharing_with_gradient_checkpointing_needs_packing():
    from rlhf.config import RewardConfig

    with pytest.raises(UserError, match=r"prefix_sharing: .* set prefix_sharing=false or training.packing=true"):
        load_config(RewardConfig, "configs/rm.yaml", ["training.gradient_checkpointing=true", "prefix_sharing=true"])
    config = load_config(RewardConfig, "configs/rm.yaml",
                         ["training.gradient_checkpointing=true", "prefix_sharing=true", "training.packing=true"])
    assert config.prefix_sharing and config.training.gradient_checkpointing


# ----------------------------------------------------------------------------- model.attn_implementation

@pytest.mark.parametrize("config_class, path, key", [("SFTConfig", "configs/sft.yaml", "model"),
                                                     ("RewardConfig", "configs/rm.yaml", "model"),
                                                     ("PPOConfig", "configs/ppo.yaml", "policy")])
def test_flash_attention_in_full_precision_is_refused_naming_the_key(config_class, path, key):
    import rlhf.config

    config_type = getattr(rlhf.config, config_class)
    with pytest.raises(UserError, match=rf"^{key}.attn_implementation: flash_attention_2 computes in fp16/bf16 only; "
                                        r"set training.mixed_precision"):
        load_config(config_type, path, [f"{key}.attn_implementation=flash_attention_2", "training.mixed_precision=no"])
    config = load_config(config_type, path, [f"{key}.attn_implementation=flash_attention_2",
                                             "training.mixed_precision=bf16"])
    assert getattr(config, key).attn_implementation == "flash_attention_2"
    assert getattr(load_config(config_type, path, []), key).attn_implementation is None  # the default: the model's own


def test_flash_attention_with_reward_model_packing_is_refused():
    from rlhf.config import RewardConfig

    with pytest.raises(UserError, match=r"^model.attn_implementation: flash_attention_2 applies no 4D attention mask"):
        load_config(RewardConfig, "configs/rm.yaml", ["model.attn_implementation=flash_attention_2",
                                                      "training.mixed_precision=bf16", "training.packing=true"])
    config = load_config(SFTConfig, "configs/sft.yaml", ["model.attn_implementation=flash_attention_2",
                                                         "training.mixed_precision=bf16", "training.packing=true"])
    assert config.training.packing  # SFT packs through position ids, which the kernel reads


def test_empty_attn_implementation_is_refused(tmp_path):
    message = load_error(tmp_path, overrides=["model.attn_implementation= "])
    assert message.startswith("model.attn_implementation: empty")
