"""Malformed inputs: each is answered by one line naming the file and the field, exit status 2
from the CLI, no traceback, and nothing half-written in the run directory.

The parser's own cases live in ``tests/test_condition.py`` (38 malformed conditions, 6 prompt
files, a template key beside a prompt file, a missing file) and the array datasets' in
``tests/test_fit_arrays.py`` (13 bad datasets, an unreadable file, an unknown option); they count
toward the suite and are not repeated here. This file adds what needs a model or a run
directory (resolution, loading, NaN activations, damaged stores, inspect, ablate and fit on
bad runs), the CLI end to end in subprocesses, and property-based tests that the parser fails
on anything with a ReduceError only.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import tomllib
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from reduce.condition import (
    _KNOWN_KEYS,
    dumps_toml,
    load_condition,
    parse_condition,
    resolve,
)
from reduce.errors import ReduceError
from reduce.inspect import inspect_unit, rank_selectivity
from reduce.models import load_model
from reduce.record import ACTIVATIONS, STATS, record
from tests.runs import (
    ROOT,
    SVA_TINY,
    assert_one_line_error,
    condition_data,
    leftovers,
    reduce_cli,
    write_condition,
)

ZOO_TINY = ROOT / "reduce" / "zoo" / "weights" / "tiny"
NEURON_TARGET = {"kind": "neuron", "site": "blocks.0.mlp.hook_post", "unit": 0}


# --- model folders with something wrong --------------------------------------------------------


def copy_zoo_tiny(folder, *, weights: bool = True):
    shutil.copytree(ZOO_TINY, folder, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    weightless = copy_zoo_tiny(root / "weightless", weights=False)
    pickled = copy_zoo_tiny(root / "pickled", weights=False)
    torch.save(load_file(ZOO_TINY / "model.safetensors"), pickled / "pytorch_model.bin")
    empty = root / "empty"
    empty.mkdir()
    headless = copy_zoo_tiny(root / "headless")
    config = (headless / "config.json").read_text().replace('"GPT2LMHeadModel"', '"GPT2Model"')
    (headless / "config.json").write_text(config)
    # Finite in float32 (the residual reaches 3.6e9) but past float16's 65504: every token
    # overflows in the residual stream leaving block 0.
    overflow = copy_zoo_tiny(root / "overflow")
    weights = load_file(ZOO_TINY / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.bias"][7] = 60000.0
    weights["transformer.h.0.mlp.c_proj.weight"][7, :] = 60000.0
    save_file(weights, overflow / "model.safetensors")
    return {"weightless": weightless, "pickled": pickled, "empty": empty, "headless": headless, "overflow": overflow}


@pytest.fixture(scope="module")
def tiny():
    return load_model("zoo:tiny")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny):
    """A finished recording of sva_tiny (read-only: tests that damage it work on a copy)."""
    run = tmp_path_factory.mktemp("recorded") / "run"
    record(SVA_TINY, run, model=tiny, progress=False)
    return run


# --- condition faults found when the condition meets its model ---------------------------------


def setting(section, **values):
    return lambda data, folders: data.setdefault(section, {}).update(values)


def neuron(site, unit):
    return setting("target", kind="neuron", site=site, unit=unit)


def model_folder(name, **more):
    return lambda data, folders: data["model"].update(name=str(folders[name]), **more)


def prompt_file_named(name):
    def edit(data, folders):
        data["prompts"] = {"file": name}
        data["target"] = dict(NEURON_TARGET)

    return edit


def huge_slot_product(data, folders):
    data["prompts"] = {"template": "{a} {b}", "slots": {"a": [f"a{i}" for i in range(1001)], "b": [f"b{i}" for i in range(1000)]}}
    data["target"] = dict(NEURON_TARGET)


def cut_inside_a_string(data, folders):
    text = SVA_TINY.read_text()
    return text[: text.index('"zoo:tiny"') + 4]  # the file ends inside the model's name


def long_prompts(data, folders):
    padding = " and the bird" * 12
    data["prompts"]["template"] += padding
    data["prompts"]["counterfactual"] += padding


# stage: "parse" fails in load_condition; "resolve" against the already loaded zoo:tiny;
# "load" when resolve loads the condition's model itself.
CONDITION_FAULTS = {
    "model path with an unknown ~user": ("parse", setting("model", name="~no_such_user_for_reduce/model"), "model.name", "not a usable path"),
    "model name neither folder nor hub id": ("parse", setting("model", name="x" * 5000), "model.name", "neither zoo:NAME"),
    "NUL byte in the prompt file name": ("parse", prompt_file_named("prompts\x00.txt"), "prompts.file", "not a usable path"),
    "NUL byte in the held-out text name": ("parse", setting("ablation", eval_text="held\x00out.txt"), "ablation.eval_text", "not a usable path"),
    "nan test fraction": ("parse", setting("fit", test_fraction=float("nan")), "fit.test_fraction", "got nan"),
    "nan threshold": ("parse", setting("fit", threshold=float("nan")), "fit.threshold", 'a number or "auto"'),
    "infinite threshold": ("parse", setting("fit", threshold=float("inf")), "fit.threshold", 'a number or "auto"'),
    "nan ablation fraction": ("parse", setting("ablation", fractions=[0.0, float("nan")]), "ablation.fractions[1]", "got nan"),
    "meta device": ("parse", setting("model", device="meta"), "model.device", "not a torch device"),
    "file cut off inside a string": ("parse", cut_inside_a_string, "end of file", "invalid TOML"),
    "answer of two tokens": ("resolve", setting("prompts", answer="{subject.verb} now"), "prompts.answer", "is 2 tokens"),
    "wrong answer of two tokens": ("resolve", setting("prompts", wrong="is are"), "prompts.wrong", "is 2 tokens"),
    "counterfactual one token longer": ("resolve", setting("prompts", counterfactual="the big {subject.flip}{modifier}"), "prompts.counterfactual", "same token count"),
    "prompts longer than the model's context": ("resolve", long_prompts, "prompts.template", "the model takes at most 32"),
    "too many prompts without a cap": ("resolve", huge_slot_product, "prompts.max_prompts", "set prompts.max_prompts"),
    "recorded layer the model lacks": ("resolve", setting("record", sites=["blocks.2.mlp.hook_post"]), "record.sites", "does not exist in this model"),
    "target layer the model lacks": ("resolve", neuron("blocks.5.mlp.hook_post", 0), "target.site", "the model has layers 0..1"),
    "MLP unit out of range": ("resolve", neuron("blocks.1.mlp.hook_post", 128), "target.unit", "has 128 units"),
    "attention unit out of range": ("resolve", neuron("blocks.0.attn.hook_z", 32), "target.unit", "has 32 units"),
    "position past the shortest prompt": ("resolve", setting("target", position=3), "target.position", "lies outside prompt 0"),
    "negative position before the first token": ("resolve", setting("target", position=-4), "target.position", "lies outside prompt 0"),
    "unknown zoo model": ("load", setting("model", name="zoo:tinyy"), "model.name", "unknown zoo model 'tinyy'"),
    "folder without weights": ("load", model_folder("weightless"), "model.name", "holds no weights"),
    "pickled weights without allow_pickle": ("load", model_folder("pickled"), "model.name", "set model.allow_pickle = true"),
    "folder without a config": ("load", model_folder("empty"), "model.name", "cannot load model config"),
    "logit target on a model without an LM head": ("load", model_folder("headless"), "target.kind", "needs a language-model head"),
    "device this machine lacks": ("load", setting("model", device="cuda:99"), "model.device", "was asked for"),
}


@pytest.mark.parametrize("case", CONDITION_FAULTS, ids=list(CONDITION_FAULTS))
def test_condition_fault_names_file_and_field(case, tmp_path, folders, tiny):
    stage, edit, field, fragment = CONDITION_FAULTS[case]
    data = condition_data()
    text = edit(data, folders)
    path = tmp_path / "cond.toml"
    path.write_text(text if isinstance(text, str) else dumps_toml(data))
    with pytest.raises(ReduceError) as caught:
        condition = load_condition(path)
        assert stage != "parse", "the parser accepted it"
        resolve(condition, tiny if stage == "resolve" else None)
    error = caught.value
    assert (error.file, error.field) == (str(path), field), str(error)
    assert fragment in error.message and "\n" not in str(error), str(error)
    if stage != "parse":  # the fault is the model's business, not the parser's
        load_condition(path)


def test_pickled_weights_load_when_allowed_and_match_safetensors(folders, tiny):
    pickled = load_model(str(folders["pickled"]), allow_pickle=True)
    ids = torch.tensor([[1, 37, 9, 55]])
    with torch.no_grad():
        assert torch.equal(pickled.module(ids).logits, tiny.module(ids).logits)


# --- faults that appear while running ------------------------------------------------------------


def test_non_finite_activation_names_site_unit_and_prompt_and_leaves_no_store(tmp_path, tiny):
    path = write_condition(tmp_path / "cond.toml", lambda data: data["record"].update(batch_size=4))
    calls = []

    def inject(module, inputs, output):  # batch 3 holds prompts 12..15: row 1 is prompt 13
        calls.append(None)
        if len(calls) == 4:
            output = output.clone()
            output[1, 2, 5] = torch.inf
        return output

    handle = tiny.layer(1).mlp.act.register_forward_hook(inject)
    try:
        with pytest.raises(ReduceError) as caught:
            record(path, tmp_path / "run", model=tiny, progress=False)
    finally:
        handle.remove()
    error = caught.value
    assert (error.file, error.field) == (str(path), "blocks.1.mlp.hook_post")
    assert "non-finite value inf at prompt 13 ('the car that the chair chases'), token 2, unit 5" in error.message, error.message
    assert leftovers(tmp_path / "run") == [] and not (tmp_path / "run" / ACTIVATIONS).exists() and not (tmp_path / "run" / STATS).exists()


def damaged_copy(recorded, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    damage(run)
    return run


RUN_FAULTS = {
    "missing run directory": (lambda run: shutil.rmtree(run), lambda run: inspect_unit(run, "blocks.0.mlp.hook_post", 0), "{run}", "record", "run `reduce record"),
    "site that was not recorded": (None, lambda run: inspect_unit(run, "blocks.0.hook_resid_pre", 0), "{run}", "site", "was not recorded"),
    "unit out of range in inspect": (None, lambda run: inspect_unit(run, "blocks.1.attn.hook_z", 32), "{run}", "unit", "has 32 units"),
    "label the prompts lack": (None, lambda run: rank_selectivity(run, "tense"), "{run}", "label", "no prompt label 'tense'"),
    "label with three values": (None, lambda run: rank_selectivity(run, "construction"), "{run}", "values", "choose two"),
    "no site matches the pattern": (None, lambda run: rank_selectivity(run, "number", "blocks.*.hook_resid_post"), "{run}", "site", "no recorded site matches"),
    "corrupted chunk": (
        lambda run: (run / ACTIVATIONS / "blocks.0.mlp.hook_post" / "c" / "0" / "0" / "0").write_bytes(b"not zstd"),
        lambda run: inspect_unit(run, "blocks.0.mlp.hook_post", 3),
        "{run}/activations.zarr",
        "blocks.0.mlp.hook_post",
        "cannot be read",
    ),
    "store without its metadata": ((lambda run: (run / ACTIVATIONS / "zarr.json").unlink()), lambda run: rank_selectivity(run, "number"), "{run}/activations.zarr", "record", "cannot be read"),
    "truncated statistics": ((lambda run: (run / STATS).write_bytes((run / STATS).read_bytes()[:100])), lambda run: inspect_unit(run, "blocks.0.mlp.hook_post", 3), "{run}/stats.nc", "record", "cannot be read"),
}


@pytest.mark.parametrize("case", RUN_FAULTS, ids=list(RUN_FAULTS))
def test_run_directory_fault_names_file_and_field(case, tmp_path, recorded):
    damage, action, file, field, fragment = RUN_FAULTS[case]
    run = damaged_copy(recorded, tmp_path, damage or (lambda run: None))
    damaged = leftovers(run)  # the damage itself may be half a store; the command must add nothing
    with pytest.raises(ReduceError) as caught:
        action(run)
    error = caught.value
    assert (error.file, error.field) == (file.format(run=run), field), str(error)
    assert fragment in error.message and "\n" not in str(error), str(error)
    assert leftovers(run) == damaged


def test_a_reused_recording_without_metadata_is_reported_not_a_traceback(tmp_path, recorded, tiny):
    run = damaged_copy(recorded, tmp_path, lambda run: (run / ACTIVATIONS / "zarr.json").unlink())
    with pytest.raises(ReduceError) as caught:
        record(SVA_TINY, run, model=tiny, progress=False)
    assert (caught.value.file, caught.value.field) == (str(run / ACTIVATIONS), "record")


def test_ablating_before_recording_asks_for_the_recording(tmp_path, tiny):
    from reduce.ablate import ablate

    with pytest.raises(ReduceError) as caught:
        ablate(SVA_TINY, tmp_path / "run", model=tiny, progress=False)
    assert (caught.value.file, caught.value.field) == (str(tmp_path / "run"), "record")
    assert "run `reduce record` on this run directory first" in caught.value.message
    assert leftovers(tmp_path / "run") == [] and not (tmp_path / "run" / "ablations.zarr").exists()


FIT_FAULTS = {
    "threshold leaving one class": (lambda data: data["fit"].update(threshold=1e9), "fit.threshold", "leaves one class only"),
    "too few prompts to split": (lambda data: data["prompts"].update(max_prompts=3), "prompts", "at least 4 prompts"),
}


@pytest.mark.parametrize("case", FIT_FAULTS, ids=list(FIT_FAULTS))
def test_fit_fault_names_field_and_writes_no_fit(case, tmp_path, tiny):
    from reduce.fit import OUTPUTS, fit

    edit, field, fragment = FIT_FAULTS[case]
    path = write_condition(tmp_path / "cond.toml", edit)
    with pytest.raises(ReduceError) as caught:
        fit(path, tmp_path / "run", model=tiny, progress=False)
    assert (caught.value.file, caught.value.field) == (str(path), field), str(caught.value)
    assert fragment in caught.value.message
    assert leftovers(tmp_path / "run") == [] and not any((tmp_path / "run" / name).exists() for name in OUTPUTS)


# --- the CLI end to end ----------------------------------------------------------------------------


def arrays(tmp_path, family="bernoulli", change=None):
    from tests.test_reduced import simulate

    dataset, _, _ = simulate(200, family, seed=13, n_blocks=10)
    dataset = change(dataset) if change else dataset
    path = tmp_path / "arrays.nc"
    dataset.to_netcdf(path, engine="h5netcdf")
    return path


def cli_condition(edit):
    def build(tmp_path, folders):
        data = condition_data()
        text = edit(data, folders)
        path = tmp_path / "cond.toml"
        path.write_text(text if isinstance(text, str) else dumps_toml(data))
        return path

    return build


def syntax_error(data, folders):
    return SVA_TINY.read_text().replace("[target]", "[target\n", 1)


def overflow_model(data, folders):
    data["model"]["name"] = str(folders["overflow"])
    data["record"]["sites"] = ["blocks.*.mlp.hook_post", "blocks.*.attn.hook_z", "blocks.0.hook_resid_post"]


# name: (arguments given tmp_path, folders and a recorded run -> argv, fragments the line must hold)
CLI_FAULTS = {
    "TOML syntax error": (lambda t, f, r: ["record", cli_condition(syntax_error)(t, f), "--out", t / "run"], ["cond.toml: line", "invalid TOML"]),
    "unknown key": (lambda t, f, r: ["check", cli_condition(setting("model", devise="cpu"))(t, f)], ["model.devise: unknown key 'devise'; did you mean 'device'?"]),
    "nan setting": (lambda t, f, r: ["record", cli_condition(setting("fit", test_fraction=float("nan")))(t, f), "--out", t / "run"], ["fit.test_fraction: expected a number, got nan"]),
    "answer of two tokens": (lambda t, f, r: ["record", cli_condition(setting("prompts", answer="{subject.verb} now"))(t, f), "--out", t / "run"], ["prompts.answer: answer 'is now'", "2 tokens"]),
    "position past the prompt": (lambda t, f, r: ["check", cli_condition(setting("target", position=6))(t, f)], ["target.position: position 6 lies outside prompt 0"]),
    "folder without weights": (lambda t, f, r: ["record", cli_condition(model_folder("weightless"))(t, f), "--out", t / "run"], ["model.name:", "holds no weights"]),
    "float16 overflow": (
        lambda t, f, r: ["record", cli_condition(overflow_model)(t, f), "--out", t / "run", "--dtype", "float16"],
        ["cond.toml: blocks.0.hook_resid_post: non-finite value inf at prompt 0 ('the bird'), token 0, unit 0", 'try model.dtype = "float32"'],
    ),
    "ablate before record": (lambda t, f, r: ["ablate", SVA_TINY, "--out", t / "run"], ["run: record:", "run `reduce record` on this run directory first"]),
    "inspect a missing run": (lambda t, f, r: ["inspect", t / "run", "--site", "blocks.0.mlp.hook_post", "--unit", "0"], ["run: record: no activations.zarr here"]),
    "inspect a damaged store": (
        lambda t, f, r: ["inspect", damaged_copy(r, t, lambda run: (run / ACTIVATIONS / "blocks.1.attn.hook_z" / "c" / "0" / "0" / "0" / "0").write_bytes(b"x")), "--rank", "number"],
        ["activations.zarr: blocks.1.attn.hook_z: cannot be read"],
    ),
    "fit-arrays with NaN inputs": (
        lambda t, f, r: ["fit-arrays", arrays(t, change=lambda d: d.assign(inputs=d["inputs"].where(d["inputs"] < 3))), "--family", "bernoulli", "--out", t / "run"],
        ["arrays.nc: inputs:", "NaN or infinite"],
    ),
    "fit-arrays with one class": (lambda t, f, r: ["fit-arrays", arrays(t, change=lambda d: d.assign(target=d["target"] * 0)), "--family", "bernoulli", "--out", t / "run"], ["arrays.nc: target: one class only"]),
    "fit-arrays on a missing file": (lambda t, f, r: ["fit-arrays", t / "nothing.nc", "--family", "gaussian", "--out", t / "run"], ["nothing.nc: data: no such file"]),
}


@pytest.mark.parametrize("case", CLI_FAULTS, ids=list(CLI_FAULTS))
def test_cli_fault_is_one_line_exit_2_and_nothing_half_written(case, tmp_path, folders, recorded):
    arguments, fragments = CLI_FAULTS[case]
    argv = arguments(tmp_path, folders, recorded)
    run = tmp_path / "run"
    before = sorted(p.name for p in run.iterdir()) if run.is_dir() else []
    result = reduce_cli(*argv, "-q")
    assert_one_line_error(result, *fragments)
    assert leftovers(run) == []
    after = sorted(p.name for p in run.iterdir()) if run.is_dir() else []
    # A failed command may leave the lock and the resolved condition; never an output.
    assert set(after) - set(before) <= {".lock", "condition.toml"}, after


def test_the_suite_is_at_least_forty_inputs():
    from tests import test_condition, test_fit_arrays
    from tests.test_reduced import simulate

    in_test_condition = len(test_condition.MALFORMED) + len(test_condition.PROMPT_FILES) + 2
    in_test_fit_arrays = len(test_fit_arrays._bad_inputs(simulate(60, seed=13, n_blocks=10)[0])) + 2
    here = len(CONDITION_FAULTS) + len(RUN_FAULTS) + len(FIT_FAULTS) + len(CLI_FAULTS) + 3
    assert in_test_condition + in_test_fit_arrays + here >= 40 and len(CLI_FAULTS) >= 10


# --- property-based: the parser fails with ReduceError and nothing else ---------------------------

VALID = condition_data()
KEYS = sorted({key for keys in _KNOWN_KEYS.values() for key in keys} | {"slots", "labels", "subject", "modifier", "text", "verb"})
# Values that reach the parser's corners: paths it resolves, names it matches, numbers it bounds.
AWKWARD = ["zoo:tiny", "zoo:", "last", "all", "neuron", "logit_diff", "blocks.0.mlp.hook_post", "blocks.*.attn.hook_z", "{subject}", "{subject.verb}", "{{", "{", "~nobody_here",
           "~nobody_here/model", "./missing", "a\x00b.txt", "x" * 300, "held.txt", "prompts.jsonl", "cuda:3", "meta", "auto", "", " "]  # fmt: skip
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=6))
scalars = st.one_of(
    st.sampled_from(AWKWARD),
    st.text(max_size=12),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.datetimes(),
    st.dates(),
    st.times(),
)
toml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4), max_leaves=10)


def parses_or_says_why(parse) -> None:
    try:
        parse()
    except ReduceError as error:
        assert error.file and error.field and "\n" not in str(error), str(error)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.dictionaries(keys, toml_values, max_size=8))
def test_random_documents_fail_only_with_reduce_error(document, tmp_path):
    parses_or_says_why(lambda: parse_condition(document, tmp_path / "random.toml"))


def slots_of(node, found):
    """Every (container, key) of a TOML document, depth first."""
    for key, value in node.items() if isinstance(node, dict) else enumerate(node):
        found.append((node, key))
        if isinstance(value, (dict, list)):
            slots_of(value, found)
    return found


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["delete", "replace", "insert"]), keys, toml_values), min_size=1, max_size=4))
def test_mutations_of_a_valid_condition_fail_only_with_reduce_error(mutations, tmp_path):
    document = copy.deepcopy(VALID)
    for where, operation, key, value in mutations:
        places = slots_of(document, [])
        if not places:
            break
        node, slot = places[where % len(places)]
        if operation == "delete":
            del node[slot]
        elif operation == "replace":
            node[slot] = value
        elif isinstance(node, dict):
            node[key] = value
        else:
            node.insert(slot, value)
    parses_or_says_why(lambda: parse_condition(document, tmp_path / "mutated.toml"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["insert", "delete", "replace"]), st.text(alphabet="[]{}\"'=.,\n#\\ az09_-~", max_size=3)), min_size=1, max_size=5))
def test_text_edits_of_a_valid_condition_fail_only_with_reduce_error(edits, tmp_path):
    text = SVA_TINY.read_text()
    for where, operation, piece in edits:
        at = where % (len(text) + 1)
        if operation == "insert":
            text = text[:at] + piece + text[at:]
        elif operation == "delete":
            text = text[:at] + text[at + len(piece) + 1 :]
        else:
            text = text[:at] + piece + text[at + len(piece) :]
    path = tmp_path / "edited.toml"
    path.write_text(text)
    parses_or_says_why(lambda: load_condition(path))


def test_the_valid_starting_point_parses():
    """The property tests start from a condition that parses, so their failures come from the edits."""
    assert parse_condition(copy.deepcopy(VALID), SVA_TINY).name == "sva_tiny"
    assert tomllib.loads(dumps_toml(VALID)) == VALID
