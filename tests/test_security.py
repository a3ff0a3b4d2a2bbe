"""Condition files and model folders are data: nothing in them is evaluated or executed unless
the condition explicitly allows it, paths resolve against the condition file, and a run writes
inside its run directory only.

Each refusal is paired with a control showing that the payload is live (it does run when the
safeguard is switched off), so the refusals are not vacuous.
"""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reduce.condition import load_condition, resolve
from reduce.errors import ReduceError
from reduce.models import load_model
from reduce.prompts import build_prompts
from tests.runs import ROOT, cli_env, leftovers, reduce_cli, write_condition

ZOO_TINY = ROOT / "reduce" / "zoo" / "weights" / "tiny"


def template_condition(tmp_path, template, slots, **prompts):
    def edit(data):
        data["prompts"] = {"template": template, "slots": slots, **prompts}
        data["target"] = {"kind": "neuron", "site": "blocks.0.mlp.hook_post", "unit": 0}

    return write_condition(tmp_path / "template.toml", edit)


# --- templates are text ------------------------------------------------------------------------------------

REFUSED_TEMPLATES = {
    "dunder slot": ("{__class__}", {}, "prompts.template", "does not define it"),
    "attribute of a slot": ("the {a.__globals__}", {"a": ["x"]}, "prompts.template", "has no field '__globals__'"),
    "format conversion": ("the {a!r}", {"a": ["x"]}, "prompts.template", "malformed placeholder"),
    "format spec": ("the {a:>10}", {"a": ["x"]}, "prompts.template", "malformed placeholder"),
    "positional field": ("the {0}", {}, "prompts.template", "malformed placeholder"),
    "item access": ("the {a[0]}", {"a": ["x"]}, "prompts.template", "malformed placeholder"),
    "nested attribute": ("the {a.b.c}", {"a": [{"text": "x", "b": "y"}]}, "prompts.template", "malformed placeholder"),
}


@pytest.mark.parametrize("case", REFUSED_TEMPLATES, ids=list(REFUSED_TEMPLATES))
def test_templates_that_str_format_would_evaluate_are_refused(tmp_path, case):
    template, slots, field, fragment = REFUSED_TEMPLATES[case]
    with pytest.raises(ReduceError) as caught:
        load_condition(template_condition(tmp_path, template, slots))
    assert caught.value.field == field and fragment in caught.value.message, str(caught.value)


def test_slot_values_and_fields_are_substituted_as_text_once(tmp_path):
    slots = {"a": [{"text": "{a.__class__}", "__globals__": "G", "code": "__import__('os').getcwd()"}]}
    condition = load_condition(template_condition(tmp_path, "{a} {a.__globals__} {a.code} {{a}}", slots, labels={"kind": "{a.code}"}))
    prompts = build_prompts(condition)
    # A value holding braces is not expanded again, a field named like a dunder is just a field,
    # code is just characters, and {{a}} is the literal "{a}".
    assert prompts.texts == ("{a.__class__} G __import__('os').getcwd() {a}",)
    assert prompts.labels == {"kind": ("__import__('os').getcwd()",)}


def test_code_in_any_string_of_a_condition_stays_text(tmp_path):
    """Python in a description, a label template or a slot field would touch the marker if
    anything evaluated it; it comes back as the same characters, through a TOML round trip too."""
    marker = tmp_path / "evaluated"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def edit(data):
        data["description"] = code
        data["prompts"]["labels"]["construction"] = code
        data["prompts"]["slots"]["modifier"][0]["construction"] = code

    condition = load_condition(write_condition(tmp_path / "code.toml", edit))
    prompts = build_prompts(condition)
    assert condition.description == code and set(prompts.labels["construction"]) == {code}
    assert load_condition(_write(tmp_path / "copy.toml", condition.to_toml())).description == code
    assert not marker.exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- weights are tensors -----------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``path`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


@pytest.fixture
def malicious_folder(tmp_path):
    """A zoo:tiny folder whose only weights are a pickle that runs code when unpickled."""
    folder = tmp_path / "malicious"
    shutil.copytree(ZOO_TINY, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(ZOO_TINY / "model.safetensors")
    weights["payload"] = _Payload(tmp_path / "pickle-ran")
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_are_refused_unless_allowed(tmp_path, malicious_folder):
    path = write_condition(tmp_path / "pickle.toml", lambda data: data["model"].update(name="./malicious"))
    with pytest.raises(ReduceError) as caught:
        resolve(load_condition(path))
    assert caught.value.field == "model.name" and "set model.allow_pickle = true" in caught.value.message
    assert not (tmp_path / "pickle-ran").exists()


def test_allowed_pickles_load_with_weights_only_so_code_in_them_does_not_run(tmp_path, malicious_folder):
    path = write_condition(tmp_path / "pickle.toml", lambda data: data["model"].update(name="./malicious", allow_pickle=True))
    with pytest.raises(ReduceError) as caught:
        resolve(load_condition(path))
    assert caught.value.field == "model.name" and "refused to load the pickled weights" in caught.value.message
    assert not (tmp_path / "pickle-ran").exists()
    # Control: the payload is live; a plain unpickling runs it.
    torch.load(malicious_folder / "pytorch_model.bin", weights_only=False)
    assert (tmp_path / "pickle-ran").exists()


# --- checkpoints' own code -----------------------------------------------------------------------------------


def remote_code_folder(folder: Path, marker: Path, *, custom_type: bool) -> Path:
    """zoo:tiny with custom classes in the folder, named by ``auto_map``; importing them creates ``marker``."""
    shutil.copytree(ZOO_TINY, folder)
    touch = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    (folder / "configuration_evil.py").write_text(touch + "from transformers import GPT2Config\n\n\nclass EvilConfig(GPT2Config):\n    model_type = 'evil'\n")
    (folder / "modeling_evil.py").write_text(touch + "from transformers import GPT2LMHeadModel\n\n\nclass EvilModel(GPT2LMHeadModel):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"}, architectures=["EvilModel"])
    if custom_type:  # an architecture the library does not know: only the folder's code can build it
        config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig", **config["auto_map"]})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_custom_architecture_is_refused_without_trust_remote_code(tmp_path):
    marker = tmp_path / "remote-code-ran"
    remote_code_folder(tmp_path / "remote", marker, custom_type=True)
    path = write_condition(tmp_path / "remote.toml", lambda data: data["model"].update(name="./remote"))
    with pytest.raises(ReduceError) as caught:
        resolve(load_condition(path))
    assert caught.value.field == "model.name" and "custom code" in caught.value.message
    assert not marker.exists()


def test_auto_map_in_a_known_architecture_loads_the_library_class_not_the_folders_code(tmp_path):
    marker = tmp_path / "remote-code-ran"
    folder = remote_code_folder(tmp_path / "remote", marker, custom_type=False)
    model = load_model(str(folder))
    assert type(model.module).__module__.startswith("transformers.") and not marker.exists()
    # Control: trusting the folder runs its code.
    load_model(str(folder), trust_remote_code=True)
    assert marker.exists()


# --- paths and where files are written -------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_condition_file_not_the_working_directory(tmp_path):
    here = tmp_path / "project" / "conditions"
    shutil.copytree(ZOO_TINY, tmp_path / "project" / "models" / "tiny")
    here.mkdir()
    (here / "prompts.txt").write_text("the bird\nthe birds near the chair\n")
    (here / "held_out.txt").write_text("the car is near the chairs .\n")

    def edit(data):
        data["model"]["name"] = "../models/tiny"
        data["prompts"] = {"file": "prompts.txt"}
        data["target"] = {"kind": "neuron", "site": "blocks.1.mlp.hook_post", "unit": 3}
        data["ablation"]["eval_text"] = "held_out.txt"

    path = write_condition(here / "relative.toml", edit)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = reduce_cli("check", path.relative_to(tmp_path), cwd=tmp_path)  # the condition named relative to the cwd
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prompts    2," in result.stdout and "gpt2, 2 layers" in result.stdout
    condition = load_condition(path)
    assert condition.model.name == str((tmp_path / "project" / "models" / "tiny").resolve())
    assert condition.prompts.file == here / "prompts.txt" and condition.ablation.eval_text == str(here / "held_out.txt")
    result = reduce_cli("check", path, cwd=elsewhere)
    assert result.returncode == 0 and "prompts    2," in result.stdout, result.stderr[-3000:]


def snapshot(*folders) -> dict[str, tuple[int, int]]:
    """(size, modification time) of every file under ``folders``."""
    files = {}
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                stat = path.stat()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.mark.slow
def test_record_and_fit_write_inside_the_run_directory_only(tmp_path):
    condition_dir, cwd, home = tmp_path / "conditions", tmp_path / "cwd", tmp_path / "home"
    for folder in (condition_dir, cwd, home):
        folder.mkdir()
    path = write_condition(condition_dir / "quick.toml", lambda data: data["fit"].update(bootstrap=2))
    run = tmp_path / "runs" / "quick"
    watched = (condition_dir, cwd, home, ROOT / "conditions", ROOT / "reduce" / "zoo" / "weights" / "tiny")
    before = snapshot(*watched)
    env = cli_env(HOME=str(home), MPLCONFIGDIR=None, XDG_CACHE_HOME=None, XDG_CONFIG_HOME=None)
    for command in ("record", "fit"):
        result = reduce_cli(command, path, "--out", run, "-q", cwd=cwd, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    after = snapshot(*watched)
    # Libraries may fill the user's cache directory (matplotlib builds its font list there once);
    # that is the only place outside the run directory where anything may appear.
    changed = {path for path in set(after) | set(before) if after.get(path) != before.get(path)}
    assert {path for path in changed if not path.startswith(str(home / ".cache") + "/")} == set()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conditions", "cwd", "home", "runs"]
    assert (run / "fit.json").is_file() and leftovers(run) == []
