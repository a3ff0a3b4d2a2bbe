"""Determinism: the same condition and seed give byte-identical outputs on this machine, run
after run, in fresh run directories; timings never enter them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from reduce.condition import load_condition
from reduce.fit import fit
from reduce.models import load_model
from reduce.record import record
from tests.runs import SVA_TINY, tree_bytes


@pytest.fixture(scope="module")
def tiny():
    return load_model("zoo:tiny")


def test_recording_twice_gives_the_same_bytes(tmp_path, tiny):
    record(SVA_TINY, tmp_path / "first", model=tiny, progress=False)
    record(SVA_TINY, tmp_path / "second", model=tiny, progress=False)
    first, second = tree_bytes(tmp_path / "first"), tree_bytes(tmp_path / "second")
    assert sorted(first) == sorted(second) and "activations.zarr/zarr.json" in first and "stats.nc" in first
    assert [name for name in first if first[name] != second[name]] == []


@pytest.mark.slow
def test_fitting_twice_gives_the_same_fit_json_and_files(tmp_path):
    condition = load_condition(SVA_TINY)
    condition = dataclasses.replace(condition, fit=dataclasses.replace(condition.fit, bootstrap=3))
    fit(condition, tmp_path / "first", progress=False)  # each loads the model itself, as a user's run does
    fit(condition, tmp_path / "second", progress=False)
    first, second = tree_bytes(tmp_path / "first"), tree_bytes(tmp_path / "second")
    assert first["fit.json"] == second["fit.json"]
    # The netCDF files and the figures too: every byte of the run directory.
    assert sorted(first) == sorted(second) and {"reduced.nc", "circuit.nc", "feature_map.nc", "bootstrap.nc"} <= set(first)
    assert [name for name in first if first[name] != second[name]] == []
    summary = json.loads(first["fit.json"])
    assert summary["converged"] and summary["interval"] is not None
    assert not [key for key in _keys(summary) if "time" in key or "second" in key], "timings belong in a separate file"


def _keys(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
