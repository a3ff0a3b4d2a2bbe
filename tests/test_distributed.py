"""Scale-out on Dask: sharded recording and many-target fitting give the serial results.

One ``LocalCluster`` of two single-threaded worker processes on 127.0.0.1 serves the module;
workers load the model once each, so the first test that uses them pays for it.
"""

from __future__ import annotations

import json

import pytest
import xarray as xr

import reduce.record as record_module
from reduce.condition import load_condition, resolve
from reduce.distributed import (
    FIT_MANY,
    _one_thread,
    fit_many,
    neuron_targets,
    record_distributed,
    target_dir,
)
from reduce.errors import ReduceError
from reduce.models import load_model
from reduce.record import ACTIVATIONS, STATS, record
from tests.runs import (
    ROOT,
    assert_one_line_error,
    cli_env,
    leftovers,
    reduce_cli,
    tree_bytes,
    write_condition,
)

pytestmark = pytest.mark.slow  # a cluster's start and its workers' model loads are most of it


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def tiny():
    return load_model("zoo:tiny")


@pytest.fixture(scope="module")
def condition_path(tmp_path_factory):
    """sva_tiny in 7 batches of 3 prompts (the last one short), so shards interleave."""
    return write_condition(tmp_path_factory.mktemp("condition") / "sharded.toml", lambda data: data["record"].update(batch_size=3))


@pytest.fixture(scope="module")
def serial(tmp_path_factory, condition_path, tiny):
    run = tmp_path_factory.mktemp("serial") / "run"
    record(condition_path, run, model=tiny, progress=False)
    return run


def assert_same_statistics(expected_path, actual_path):
    """Every statistic bit for bit: each batch's accumulator, merged in batch order, adds what
    streaming that batch adds."""
    expected, actual = xr.load_dataset(expected_path, engine="h5netcdf"), xr.load_dataset(actual_path, engine="h5netcdf")
    assert actual.identical(expected)


@pytest.mark.parametrize("batches_per_task", [1, 3])
def test_sharded_recording_equals_the_serial_one(tmp_path, client, condition_path, serial, tiny, batches_per_task):
    run = tmp_path / "run"
    dataset = record_distributed(condition_path, run, client, model=tiny, batches_per_task=batches_per_task, progress=False)
    assert dataset.sizes["prompt"] == 20
    assert tree_bytes(run / ACTIVATIONS) == tree_bytes(serial / ACTIVATIONS)  # every chunk and every byte of metadata
    assert_same_statistics(serial / STATS, run / STATS)
    assert leftovers(run) == []
    assert json.loads((run / "stages.json").read_text()) == json.loads((serial / "stages.json").read_text())


def test_the_serial_path_reuses_a_sharded_recording(tmp_path, client, condition_path, tiny, monkeypatch):
    run = tmp_path / "run"
    record_distributed(condition_path, run, client, model=tiny, progress=False)
    monkeypatch.setattr(record_module, "_write_recording", lambda *args: pytest.fail("recorded again"))
    assert record(condition_path, run, model=tiny, progress=False).sizes["prompt"] == 20


def test_a_serial_recording_cut_short_is_finished_on_the_cluster(tmp_path, client, condition_path, serial, tiny, monkeypatch):
    run = tmp_path / "run"
    real_forwards = record_module.Recording.forwards

    def interrupted(self, indices, **options):  # Ctrl-C after two batches
        for count, activations in enumerate(real_forwards(self, indices, **options)):
            if count == 2:
                raise KeyboardInterrupt
            yield activations

    monkeypatch.setattr(record_module.Recording, "forwards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        record(condition_path, run, model=tiny, progress=False)
    monkeypatch.undo()
    manifest = json.loads((run / ".activations.zarr.manifest.json").read_text())
    assert manifest["done"] == [0, 1]
    record_distributed(condition_path, run, client, model=tiny, progress=False)
    assert tree_bytes(run / ACTIVATIONS) == tree_bytes(serial / ACTIVATIONS)
    assert_same_statistics(serial / STATS, run / STATS)
    assert leftovers(run) == []


# --- many targets ---------------------------------------------------------------------------------

TARGETS = [("blocks.1.mlp.hook_post", 3), ("blocks.1.mlp.hook_post", 77), ("blocks.1.attn.hook_z", 5)]


@pytest.fixture(scope="module")
def fit_condition(tmp_path_factory):
    """Every position a sample (100 of them), a Gaussian fit, no bootstrap: quick fits."""

    def edit(data):
        data["target"]["position"] = "all"
        data["fit"].update(family="gaussian", bootstrap=0, folds=2)

    return write_condition(tmp_path_factory.mktemp("fit") / "neurons.toml", edit)


@pytest.fixture(scope="module")
def serial_fits(tmp_path_factory, fit_condition, tiny):
    run = tmp_path_factory.mktemp("serial_fits") / "run"
    return run, fit_many(fit_condition, run, TARGETS, model=tiny, progress=False)


def test_fitting_targets_on_the_cluster_equals_fitting_them_here(tmp_path, client, fit_condition, serial_fits):
    serial_run, serial_results = serial_fits
    run = tmp_path / "run"
    results = fit_many(fit_condition, run, TARGETS, client, progress=False)
    assert results == serial_results
    assert all(outcome["converged"] and outcome["held_out"]["r2"] > 0.3 for outcome in results.values()), results
    for site, unit in TARGETS:  # every output of every fit, byte for byte
        assert tree_bytes(target_dir(run, site, unit)) == tree_bytes(target_dir(serial_run, site, unit)), (site, unit)
    assert json.loads((run / FIT_MANY).read_text()) == json.loads((serial_run / FIT_MANY).read_text())
    assert leftovers(run) == []


def test_a_target_fit_is_the_fit_of_the_condition_with_that_target(tmp_path, fit_condition, serial_fits, tiny):
    """fit_many reads a neuron target from the shared recording; recording the condition with
    that neuron as its own target and fitting it gives the same fit."""
    from dataclasses import replace

    from reduce.fit import fit

    serial_run, serial_results = serial_fits
    site, unit = TARGETS[0]
    condition = load_condition(fit_condition)
    neuron = replace(condition, target=replace(condition.target, kind="neuron", site=site, unit=unit))
    with _one_thread():  # as fit_many fits
        alone = fit(neuron, tmp_path / "alone", model=tiny, progress=False)
    assert alone == serial_results[(site, unit)]
    assert (tmp_path / "alone" / "reduced.nc").read_bytes() == (target_dir(serial_run, site, unit) / "reduced.nc").read_bytes()


def test_finished_targets_are_reused_and_failures_reported(tmp_path, fit_condition, serial_fits, tiny, monkeypatch):
    import reduce.fit

    serial_run, serial_results = serial_fits
    monkeypatch.setattr(reduce.fit, "_fit", lambda *args: pytest.fail("fitted again"))
    assert fit_many(fit_condition, serial_run, TARGETS, model=tiny, progress=False) == serial_results
    monkeypatch.undo()
    one_class = write_condition(tmp_path / "one_class.toml", lambda data: data["fit"].update(threshold=1e9, bootstrap=0, folds=2))
    results = fit_many(one_class, tmp_path / "run", TARGETS[:1], model=tiny, progress=False)
    assert "fit.threshold: threshold 1e+09 leaves one class only" in results[TARGETS[0]]["error"]
    listing = json.loads((tmp_path / "run" / FIT_MANY).read_text())["targets"]
    assert listing == [{"site": TARGETS[0][0], "unit": TARGETS[0][1], "error": results[TARGETS[0]]["error"]}]


def test_neuron_targets_cover_a_site_and_check_units(fit_condition, tiny):
    condition = load_condition(fit_condition)
    assert neuron_targets(condition, "blocks.0.mlp.hook_post", model=tiny) == [("blocks.0.mlp.hook_post", u) for u in range(128)]
    assert neuron_targets(condition, "blocks.1.attn.hook_z", [0, 31], model=tiny) == [("blocks.1.attn.hook_z", 0), ("blocks.1.attn.hook_z", 31)]
    with pytest.raises(ReduceError) as caught:
        neuron_targets(condition, "blocks.1.attn.hook_z", [32], model=tiny)
    assert caught.value.field == "--units" and "has 32 units" in caught.value.message
    with pytest.raises(ReduceError) as caught:
        neuron_targets(condition, "blocks.2.mlp.hook_post", model=tiny)
    assert caught.value.field == "--neurons"


# --- the CLI and the model's placement ------------------------------------------------------------


def test_cli_records_and_fits_on_an_existing_scheduler(tmp_path, client, condition_path, serial, fit_condition, serial_fits):
    address = client.scheduler.address
    assert address.startswith("tcp://127.0.0.1:")
    result = reduce_cli("record", condition_path, "--out", tmp_path / "run", "--scheduler", address, "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree_bytes(tmp_path / "run" / ACTIVATIONS) == tree_bytes(serial / ACTIVATIONS)
    serial_run, _ = serial_fits
    result = reduce_cli("fit-many", fit_condition, "--out", tmp_path / "fits", "--neurons", "blocks.1.mlp.hook_post", "--units", "3,77", "--scheduler", address, "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 targets: 2 converged" in result.stdout
    for site, unit in TARGETS[:2]:
        assert (target_dir(tmp_path / "fits", site, unit) / "fit.json").read_bytes() == (target_dir(serial_run, site, unit) / "fit.json").read_bytes()


def test_cli_cluster_options_are_checked(tmp_path, condition_path):
    both = reduce_cli("record", condition_path, "--out", tmp_path / "run", "--scheduler", "tcp://127.0.0.1:1", "--workers", "2")
    assert_one_line_error(both, "--workers: give --scheduler (an existing cluster) or --workers (a local one), not both")
    nobody = reduce_cli("record", condition_path, "--out", tmp_path / "run", "--scheduler", "tcp://127.0.0.1:1", env=cli_env(DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="3s"))
    assert_one_line_error(nobody, "--scheduler: cannot reach the Dask scheduler at 'tcp://127.0.0.1:1'")
    assert leftovers(tmp_path / "run") == []


def test_device_map_auto_goes_to_from_pretrained_and_loads_on_cpu(tmp_path, tiny, monkeypatch):
    import transformers

    seen = []
    real = transformers.GPT2LMHeadModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", classmethod(spy))
    path = write_condition(tmp_path / "auto.toml", lambda data: data["model"].update(device_map="auto"))
    resolved = resolve(load_condition(path))
    assert seen == ["auto"]
    assert {parameter.device.type for parameter in resolved.model.module.parameters()} == {"cpu"}
    placed = record(path, tmp_path / "auto", model=resolved.model, progress=False).load()
    plain = record(ROOT / "conditions" / "sva_tiny.toml", tmp_path / "plain", model=tiny, progress=False).load()
    assert placed.identical(plain)


# Last: it makes the workers load another model.
def test_a_fault_on_a_worker_names_file_and_field_and_leaves_no_store(tmp_path, client):
    from safetensors.torch import load_file, save_file

    from tests.test_bad_inputs import ZOO_TINY, copy_zoo_tiny

    folder = copy_zoo_tiny(tmp_path / "overflow")
    weights = load_file(ZOO_TINY / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.bias"][7] = 60000.0  # past float16's range in the residual
    weights["transformer.h.0.mlp.c_proj.weight"][7, :] = 60000.0
    save_file(weights, folder / "model.safetensors")

    def edit(data):
        data["model"].update(name=str(folder), dtype="float16")
        data["record"].update(sites=["blocks.0.hook_resid_post"], batch_size=5)

    path = write_condition(tmp_path / "overflow.toml", edit)
    with pytest.raises(ReduceError) as caught:
        record_distributed(path, tmp_path / "run", client, progress=False)
    assert (caught.value.file, caught.value.field) == (str(path), "blocks.0.hook_resid_post")
    assert "non-finite value inf" in caught.value.message
    assert leftovers(tmp_path / "run") == [] and not (tmp_path / "run" / ACTIVATIONS).exists()
