"""`rlhf sft` through a real subprocess: a user mistake is one line on stderr, exit status 2, no traceback.

Each launch pays the library's import time, so every case is started at once by one fixture and
the tests read the finished processes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from conftest import make_rows, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = "rlhf sft: error: "


@pytest.fixture(scope="module")
def cli_results(tokenizer_dir, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("cli")
    train = write_jsonl(root / "train.jsonl", make_rows(8))
    questions = write_jsonl(root / "qa.jsonl", [{"question": r["prompt"], "answer": r["response"]} for r in make_rows(4)])
    config = {
        "output_dir": str(root / "run"),
        "model": {"from_config": {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32}, "tokenizer": tokenizer_dir},
        "data": {"path": train, "eval_fraction": 0.0, "max_length": 32},
        "training": {"max_steps": 1, "batch_size": 4},
        "logging": {"num_samples": 0},
    }
    config_path = root / "sft.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    cases = {
        "unknown_key": [str(config_path), "training.lrr=1e-4"],
        "wrong_type": [str(config_path), "training.batch_size=four"],
        "missing_config": [str(root / "nope.yaml")],
        "missing_data": [str(config_path), f"data.path={root / 'missing.jsonl'}", f"output_dir={root / 'run-1'}"],
        "missing_column": [str(config_path), f"data.path={questions}", f"output_dir={root / 'run-2'}"],
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    processes = {name: subprocess.Popen([sys.executable, "-m", "rlhf", "sft", "--config", path, *overrides],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
                 for name, (path, *overrides) in cases.items()}
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line; anything else on stderr may only be log lines from before the error."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(PREFIX)]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]  # the last word is the error
    return errors[0]


@pytest.mark.parametrize("case, expected", [
    ("unknown_key", ["unknown key 'training.lrr'", "did you mean 'training.lr'?"]),
    ("wrong_type", ["training.batch_size", "expected an integer", "'four'"]),
    ("missing_config", ["config file", "nope.yaml", "not found"]),
])
def test_config_errors_are_the_only_line_on_stderr(cli_results, case, expected):
    result = cli_results[case]
    line = error_line(result)
    assert result.stderr.strip() == line  # nothing else: the config is checked before any work
    for piece in expected:
        assert piece in line, line
    assert result.stdout == ""


def test_missing_data_file_names_the_key_and_the_path(cli_results):
    line = error_line(cli_results["missing_data"])
    assert line.startswith(PREFIX + "data.path: file ") and "missing.jsonl' not found" in line


def test_missing_column_names_the_file_and_the_columns_found(cli_results):
    line = error_line(cli_results["missing_column"])
    assert "qa.jsonl" in line and "'question', 'answer'" in line and "data.columns" in line


# ----------------------------------------------------------------------------- discoverability (in-process: no import cost)

def test_stage_help_lists_config_keys_by_block(capsys):
    from rlhf.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["ppo", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--print-config" in text and "--resume" in text
    assert "\nppo: algorithm (block)" in text
    assert "  ppo.kl_coef  (float, default: 0.05)" in text
    assert "  sampling.top_k  (int, default: 0)" in text
    assert "    policy.from_config.n_embd  (int, default: 128)" in text


@pytest.mark.parametrize("command, config", [("sft", "configs/sft.yaml"), ("rm", "configs/rm_gpt2.yaml"),
                                             ("ppo", "configs/ppo.yaml"), ("pipeline", "configs/pipeline.yaml")])
def test_print_config_writes_yaml_that_loads_back_unchanged(command, config, capsys, tmp_path):
    from rlhf.cli import config_class_of, main
    from rlhf.config import load_config

    overrides = ["seed=5", "rm.training.lr=2e-4"] if command == "pipeline" else ["training.lr=2e-4", "overwrite=true"]
    assert main([command, "--config", os.path.join(REPO, config), "--print-config", *overrides]) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and printed.out.startswith(f"# rlhf {command} config: ")
    path = tmp_path / "printed.yaml"
    path.write_text(printed.out, encoding="utf-8")
    expected = load_config(config_class_of(command), os.path.join(REPO, config), overrides)
    assert load_config(config_class_of(command), str(path)) == expected


def test_print_config_of_the_defaults_needs_no_config_file(capsys):
    from rlhf.cli import main

    assert main(["rm", "--print-config"]) == 0
    text = capsys.readouterr().out
    parsed = yaml.safe_load(text)
    assert parsed["model"]["name_or_path"] == "runs/sft/final" and parsed["head_init"] == "normal"
    assert "# from_config:\n  #   n_layer: 4" in text  # a null block shows what it would take


def test_missing_config_and_bad_override_in_print_config_are_one_line(capsys):
    from rlhf.cli import main

    assert main(["sft"]) == 2
    assert capsys.readouterr().err == ("rlhf sft: error: --config is required; `rlhf sft --print-config` writes a "
                                       "commented config to start from\n")
    assert main(["sft", "--print-config", "training.lrr=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("rlhf sft: error: config: unknown key 'training.lrr'")
