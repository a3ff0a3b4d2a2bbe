import os
import subprocess
import sys
from pathlib import Path

import pytest

from reduce.cli import COMMANDS, main
from tests.test_record import CONDITION, TOKEN_FAMILIES
from tests.tiny import tiny_folder

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "reduce", *map(str, args)], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_bad_condition_is_one_line_and_exit_2(tmp_path):
    condition = tmp_path / "bad.toml"
    condition.write_text('name = "x"\n[model]\nname = "tiny"\nbatch = 3\n')
    assert_one_line_error(run_cli("check", condition), f"{condition.resolve()}: model.batch: unknown key 'batch'")
    condition.write_text('name = "x"\n[model\nname = "tiny"\n')
    assert_one_line_error(run_cli("record", condition, "--out", tmp_path / "run"), "line 2", "invalid TOML")


def test_hub_model_that_is_not_here_is_one_line():
    result = run_cli("check", ROOT / "conditions" / "gpt2_hub.toml", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, "model.name", "hub model 'gpt2' is not in the local cache")


def condition_file(tmp_path, folder, family):
    text = CONDITION.format(batch_size=5, position="last").replace('name = "tiny"\n[prompts]', f'name = "./{folder.name}"\n[prompts]')
    if family in ("bert", "roberta"):
        text = text.replace('position = "last"', "position = 2")
    path = tmp_path / f"{family}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
def test_check_record_inspect_on_every_token_family(tmp_path, capsys, family):
    folder = tiny_folder(family, tmp_path / f"model-{family}")
    condition = condition_file(tmp_path, folder, family)
    run = tmp_path / "run"
    assert main(["check", str(condition), "--dtype", "float64"]) == 0
    shown = capsys.readouterr().out
    assert f"{family}" in shown and "float64 on cpu" in shown and "prompts    12," in shown and "label      number: plural, singular" in shown
    assert main(["record", str(condition), "--out", str(run), "-q"]) == 0
    assert "recorded 12 prompts" in capsys.readouterr().out
    assert main(["inspect", str(run), "--rank", "number", "--top", "3"]) == 0
    ranking = capsys.readouterr().out
    assert "selectivity for number" in ranking and len(ranking.splitlines()) == 5
    if family == "gpt2":  # the histogram figure once is enough
        assert main(["inspect", str(run), "--site", "blocks.0.mlp.hook_post", "--unit", "7", "--top", "4"]) == 0
        assert "top 4 activations" in capsys.readouterr().out and (run / "inspect" / "blocks.0.mlp.hook_post.7.png").exists()


def test_pixel_models_are_refused_in_one_line(tmp_path, capsys):
    folder = tiny_folder("vit", tmp_path / "model-vit")
    capsys.readouterr()
    assert main(["check", str(condition_file(tmp_path, folder, "vit"))]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # (after transformers' own loading bar, in-process)
    assert error.startswith("reduce check: error: ") and "model.name: vit models take pixels, not text" in error


def test_inspect_needs_a_unit_or_a_label(tmp_path, capsys):
    assert main(["inspect", str(tmp_path), "--site", "blocks.0.mlp.hook_post"]) == 2
    assert "--unit: give --site and --unit (or --rank LABEL)" in capsys.readouterr().err


def test_subcommands_come_from_one_table():
    assert {"check", "record", "inspect"} <= set(COMMANDS)
    for name, command in COMMANDS.items():
        assert command.name == name and command.help and callable(command.run)
