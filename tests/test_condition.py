import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reduce.condition import AblationSpec, FitSpec, RecordSpec, _toml_value, load_condition, parse_condition
from reduce.errors import ReduceError

VALID = """
name = "sva"
seed = 3

[model]
name = "tiny-hub-id"

[prompts]
template = "the {subject} near the {attractor}"
answer = "{subject.verb}"
wrong = "{subject.wrong}"
counterfactual = "the {subject.flip} near the {attractor}"

[prompts.slots]
subject = [ { text = "key", verb = "is", wrong = "are", flip = "keys", number = "singular" },
            { text = "keys", verb = "are", wrong = "is", flip = "key", number = "plural" } ]
attractor = ["cabinet", "cabinets"]

[prompts.labels]
number = "{subject.number}"

[target]
kind = "logit_diff"
"""


def write(tmp_path, text, name="cond.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_condition_has_schema_defaults(tmp_path):
    condition = load_condition(write(tmp_path, VALID))
    assert condition.name == "sva" and condition.seed == 3 and condition.path == (tmp_path / "cond.toml").resolve()
    assert condition.model.device == "cpu" and condition.model.dtype == "float32" and condition.model.device_map == ""
    assert condition.prompts.slots["attractor"] == ({"text": "cabinet"}, {"text": "cabinets"})
    assert condition.target.position == "last" and condition.target.site is None
    assert condition.record == RecordSpec() and condition.record.sites == ("blocks.*.mlp.hook_post", "blocks.*.attn.hook_z")
    assert condition.ablation == AblationSpec() and condition.ablation.fractions[-1] == 1.0 and condition.ablation.seeds == (0, 1, 2)
    assert condition.fit == FitSpec() and condition.fit.threshold == "auto" and condition.fit.bootstrap == 100


def test_to_toml_round_trips_and_paths_become_absolute(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.jsonl").write_text(json.dumps({"text": "a b", "answer": "c", "wrong": "d", "topic": 3}) + "\n")
    text = VALID.replace('name = "tiny-hub-id"', 'name = "./model"').replace('template = "the {subject} near the {attractor}"', 'file = "data/prompts.jsonl"')
    text = "\n".join(line for line in text.splitlines() if not line.startswith(("answer", "wrong", "counterfactual", "subject", "attractor", "number", "  ", "[prompts.")))
    text = text.replace("[target]", '[ablation]\nbaselines = ["zero", "mean"]\neval_text = "zoo"\n[fit]\nthreshold = 0.5\n[target]')
    condition = load_condition(write(tmp_path, text, "sub.toml"))
    assert condition.model.name == str((tmp_path / "model").resolve())
    assert condition.prompts.file == (tmp_path / "data" / "prompts.jsonl").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = load_condition(write(elsewhere, condition.to_toml(), "copy.toml"))
    assert copy.model == condition.model and copy.prompts == condition.prompts and copy.fit.threshold == 0.5
    template = load_condition(write(tmp_path, VALID))
    again = parse_condition(tomllib.loads(template.to_toml()), template.path)
    assert again == template


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(st.text(max_size=5), max_size=4)))
def test_toml_values_round_trip(value):
    assert tomllib.loads(f"x = {_toml_value(value)}")["x"] == value


def test_fingerprint_is_stable_and_follows_what_a_stage_depends_on(tmp_path):
    first = load_condition(write(tmp_path, VALID))
    assert first.fingerprint("model", "prompts") == load_condition(write(tmp_path, VALID, "same.toml")).fingerprint("model", "prompts")
    reseeded = load_condition(write(tmp_path, VALID.replace("seed = 3", "seed = 4"), "seed.toml"))
    assert reseeded.fingerprint("prompts") != first.fingerprint("prompts")
    assert reseeded.fingerprint("model", "target") == first.fingerprint("model", "target")
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n")
    by_file = VALID.replace('template = "the {subject} near the {attractor}"', 'file = "p.txt"').replace('kind = "logit_diff"', 'kind = "neuron"\nsite = "blocks.0.mlp.hook_post"\nunit = 1')
    by_file = "\n".join(line for line in by_file.splitlines() if not line.startswith(("answer", "wrong", "counterfactual", "subject", "attractor", "number", "  ", "[prompts.")))
    before = load_condition(write(tmp_path, by_file, "file.toml")).fingerprint("prompts")
    prompts.write_text("two\n")
    assert load_condition(tmp_path / "file.toml").fingerprint("prompts") != before


def test_default_baselines_skip_the_counterfactual_resample_without_pairs(tmp_path):
    condition = load_condition(write(tmp_path, _drop("counterfactual")(VALID)))
    assert condition.ablation.baselines == ("zero", "mean", "peak", "resample_tokens")


def test_overrides(tmp_path):
    condition = load_condition(write(tmp_path, VALID)).with_overrides(device="cuda:1", dtype="bfloat16")
    assert (condition.model.device, condition.model.dtype) == ("cuda:1", "bfloat16")
    with pytest.raises(ReduceError, match="model.dtype"):
        condition.with_overrides(dtype="float8")


def _edit(old, new):
    return lambda text: text.replace(old, new, 1)


def _drop(prefix):
    return lambda text: "\n".join(line for line in text.splitlines() if not line.startswith(prefix))


def _prompt_file(name, content):
    def edit(text, tmp_path):
        (tmp_path / name).write_text(content)
        text = _drop(("answer", "wrong", "counterfactual", "subject", "attractor", "number", "  ", "[prompts."))(text)
        return text.replace('template = "the {subject} near the {attractor}"', f'file = "{name}"').replace('kind = "logit_diff"', 'kind = "neuron"\nsite = "blocks.0.mlp.hook_post"\nunit = 0')

    return edit


MALFORMED = {
    "syntax": (_edit("seed = 3", "seed = = 3"), "line 3", "invalid TOML"),
    "unknown top-level key": (_edit("seed = 3", "seed = 3\n[modle]\nname = 'x'"), "modle", "did you mean 'model'"),
    "unknown key": (_edit("[target]", "[record]\nbatchsize = 4\n[target]"), "record.batchsize", "did you mean 'batch_size'"),
    "bool is not int": (_edit("[target]", "[record]\nbatch_size = true\n[target]"), "record.batch_size", "expected an integer, got a boolean"),
    "string is not int": (_edit("seed = 3", 'seed = "3"'), "seed", "expected an integer"),
    "missing name": (_drop('name = "sva"'), "name", "required field is missing"),
    "missing section": (_drop(("[target]", 'kind = "logit_diff"')), "target", "required field is missing"),
    "bad name": (_edit('name = "sva"', 'name = "SVA run"'), "name", "lower-case"),
    "bad enum": (_edit('kind = "logit_diff"', 'kind = "logits"'), "target.kind", "did you mean 'logit'"),
    "bad dtype": (_edit('name = "tiny-hub-id"', 'name = "tiny-hub-id"\ndtype = "fp32"'), "model.dtype", "not one of float32"),
    "bad device": (_edit('name = "tiny-hub-id"', 'name = "tiny-hub-id"\ndevice = "gpu"'), "model.device", "torch device"),
    "missing local model": (_edit('name = "tiny-hub-id"', 'name = "./no-such-model"'), "model.name", "does not exist"),
    "undefined slot": (_edit("near the {attractor}\"\nanswer", "near the {atractor}\"\nanswer"), "prompts.template", "does not define it; did you mean 'attractor'"),
    "undefined slot field": (_edit('answer = "{subject.verb}"', 'answer = "{subject.verbs}"'), "prompts.answer", "has no field 'verbs'"),
    "field missing in one value": (_edit('flip = "key", number = "plural"', 'flip = "key"'), "prompts.labels.number", "no field 'number'"),
    "malformed placeholder": (_edit('"the {subject} near the {attractor}"', '"the {subject near the {attractor}"'), "prompts.template", "malformed placeholder"),
    "empty slot": (_edit('attractor = ["cabinet", "cabinets"]', "attractor = []"), "prompts.slots.attractor", "at least one value"),
    "slot value type": (_edit('attractor = ["cabinet", "cabinets"]', 'attractor = ["cabinet", 2]'), "prompts.slots.attractor[1]", "expected a string or a table"),
    "unused slot": (_edit('attractor = ["cabinet", "cabinets"]', 'attractor = ["cabinet", "cabinets"]\ncolour = ["red"]'), "prompts.slots.colour", "no template uses it"),
    "reserved label": (_edit('number = "{subject.number}"', 'text = "{subject.number}"'), "prompts.labels.text", "must be a name"),
    "neither template nor file": (_drop("template"), "prompts", "exactly one of"),
    "template and file": (_edit("[prompts]", '[prompts]\nfile = "p.txt"'), "prompts", "exactly one of"),
    "max_prompts zero": (_edit("[prompts]", "[prompts]\nmax_prompts = 0"), "prompts.max_prompts", "at least 1"),
    "neuron without unit": (_edit('kind = "logit_diff"', 'kind = "neuron"\nsite = "blocks.0.mlp.hook_post"'), "target.unit", "needs target.site and target.unit"),
    "site on a logit target": (_edit('kind = "logit_diff"', 'kind = "logit_diff"\nsite = "blocks.0.mlp.hook_post"'), "target.site", "only neuron targets"),
    "bad site name": (_edit('kind = "logit_diff"', 'kind = "neuron"\nsite = "blocks.0.mlp.post"\nunit = 1'), "target.site", "unknown site"),
    "bad position": (_edit('kind = "logit_diff"', 'kind = "logit_diff"\nposition = 1.5'), "target.position", "integer token index"),
    "logit_diff without wrong": (_drop("wrong"), "target.kind", "needs each prompt's wrong"),
    "site pattern matches nothing": (_edit("[target]", '[record]\nsites = ["blocks.*.mlp.hook_pre"]\n[target]'), "record.sites", "matches no site"),
    "empty sites": (_edit("[target]", "[record]\nsites = []\n[target]"), "record.sites", "must not be empty"),
    "odd bins": (_edit("[target]", "[record]\nbins = 101\n[target]"), "record.bins", "even"),
    "fraction out of range": (_edit("[target]", "[ablation]\nfractions = [0.0, 1.5]\n[target]"), "ablation.fractions[1]", "[0.0, 1.0]"),
    "unknown baseline": (_edit("[target]", '[ablation]\nbaselines = ["zero", "peek"]\n[target]'), "ablation.baselines[1]", "did you mean 'peak'"),
    "counterfactual baseline without pairs": (
        lambda text: _drop("counterfactual")(text).replace("[target]", '[ablation]\nbaselines = ["zero", "resample_counterfactual"]\n[target]'),
        "ablation.baselines",
        "needs paired prompts",
    ),
    "missing eval text": (_edit("[target]", '[ablation]\neval_text = "held_out.txt"\n[target]'), "ablation.eval_text", "existing .txt"),
    "threshold type": (_edit("[target]", "[fit]\nthreshold = true\n[target]"), "fit.threshold", "a number or \"auto\""),
    "test fraction bounds": (_edit("[target]", "[fit]\ntest_fraction = 1.0\n[target]"), "fit.test_fraction", "(0.0, 1.0)"),
    "section is not a table": (_edit("seed = 3", "seed = 3\nfit = 3"), "fit", "expected a table"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_condition_names_file_and_field(tmp_path, case):
    edit, field, message = MALFORMED[case]
    path = write(tmp_path, edit(VALID))
    with pytest.raises(ReduceError) as caught:
        load_condition(path)
    error = caught.value
    assert error.file == str(path.resolve()) or error.file == str(path)
    assert error.field == field, str(error)
    assert message in error.message, str(error)
    assert "\n" not in str(error) and str(error).startswith(f"{error.file}: {field}: ")


PROMPT_FILES = {
    "empty txt": ("p.txt", "\n\n", "prompts.file", "holds no prompts"),
    "wrong suffix": ("p.csv", "a\n", "prompts.file", "must end in .txt or .jsonl"),
    "bad json": ("p.jsonl", '{"text": "a"}\n{"text": \n', "line 2", "invalid JSON"),
    "missing text": ("p.jsonl", '{"text": "a"}\n{"answer": "b"}\n', "line 2.text", "non-empty string 'text'"),
    "answer not a string": ("p.jsonl", '{"text": "a", "answer": 3}\n', "line 1.answer", "must be a string"),
    "inconsistent labels": ("p.jsonl", '{"text": "a", "topic": "x"}\n{"text": "b"}\n', "line 2", "differs in topic"),
}


@pytest.mark.parametrize("case", PROMPT_FILES, ids=list(PROMPT_FILES))
def test_malformed_prompt_file(tmp_path, case):
    name, content, field, message = PROMPT_FILES[case]
    path = write(tmp_path, _prompt_file(name, content)(VALID, tmp_path))
    with pytest.raises(ReduceError) as caught:
        load_condition(path)
    assert caught.value.field == field and message in caught.value.message, str(caught.value)
    assert caught.value.file in (str(tmp_path / name), str(path.resolve()))


def test_prompt_file_cannot_take_template_keys(tmp_path):
    text = _prompt_file("p.txt", "a b\n")(VALID, tmp_path).replace('file = "p.txt"', 'file = "p.txt"\nanswer = "x"')
    with pytest.raises(ReduceError, match="prompts.answer: with prompts.file"):
        load_condition(write(tmp_path, text))


def test_missing_condition_file(tmp_path):
    with pytest.raises(ReduceError, match="does not exist"):
        load_condition(tmp_path / "nope.toml")
