import numpy as np
import pytest
import xarray as xr
from sklearn.metrics import roc_auc_score

from reduce.errors import ReduceError
from reduce.inspect import format_selectivity, inspect_unit, rank_selectivity
from reduce.record import record
from tests.test_record import tiny_condition
from tests.tiny import tiny_text_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect")
    record(tiny_condition(folder, position="all"), folder / "run", model=tiny_text_model("gpt2"), progress=False)
    return folder / "run"


def test_inspect_unit_lists_the_top_tokens_in_context_and_saves_files(run_dir):
    report = inspect_unit(run_dir, "blocks.1.attn.hook_z", 13, top=5)
    values = xr.open_zarr(run_dir / "activations.zarr")["blocks.1.attn.hook_z"].values.reshape(12, -1, 32)[:, :, 13]
    expected = np.sort(values[~np.isnan(values)])[::-1][:5]
    np.testing.assert_allclose(report.top.value.to_numpy(), expected)
    first = report.top.iloc[0]
    assert values[first.prompt, first.pos] == first.value
    assert f"[[{first.token}]]" in first.context and first.context in report.text
    assert first.context.replace("[[", "").replace("]]", "") == str(xr.open_zarr(run_dir / "activations.zarr").text.values[first.prompt])
    assert report.summary["tokens"] == int((~np.isnan(values)).sum())
    stats = xr.load_dataset(run_dir / "stats.nc")
    row = int(np.flatnonzero((stats.site == "blocks.1.attn.hook_z").values & (stats["index"] == 13).values)[0])
    for key in ("mean", "min", "max", "peak", "peak_naive"):
        assert report.summary[key] == pytest.approx(float(stats[key][row]), rel=1e-6), key
    assert [p.suffix for p in report.files] == [".txt", ".csv", ".png"] and all(p.stat().st_size > 0 for p in report.files)
    assert report.files[2].read_bytes()[:4] == b"\x89PNG"


def test_inspect_unit_errors(run_dir, tmp_path):
    with pytest.raises(ReduceError, match="unit 32 is out of range: blocks.1.attn.hook_z has 32 units"):
        inspect_unit(run_dir, "blocks.1.attn.hook_z", 32)
    with pytest.raises(ReduceError, match="site: site 'blocks.7.mlp.hook_post' was not recorded"):
        inspect_unit(run_dir, "blocks.7.mlp.hook_post", 0)
    with pytest.raises(ReduceError, match="record: no activations.zarr here"):
        inspect_unit(tmp_path, "blocks.0.mlp.hook_post", 0)


def test_rank_selectivity_matches_auroc_and_d_prime(run_dir):
    table = rank_selectivity(run_dir, "number", "blocks.*.mlp.hook_post")
    dataset = xr.open_zarr(run_dir / "activations.zarr")
    mask = dataset.target_mask.values
    labels = np.repeat(np.asarray(dataset.number.values).astype(object), mask.sum(1))
    first, second = table.attrs["values"]
    assert {first, second} == {"singular", "plural"} and len(table) == 2 * 128
    scores = np.abs(table.auroc - 0.5).to_numpy()
    assert np.all(np.diff(scores) <= 1e-12), "sorted by |AUROC - 0.5|"
    for row in table.head(3).itertuples():
        activations = dataset[row.site].values[:, :, row.index][mask]
        a, b = activations[labels == first], activations[labels == second]
        assert row.auroc == pytest.approx(roc_auc_score(labels == first, activations))
        assert row.d_prime == pytest.approx((a.mean() - b.mean()) / np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2), rel=1e-5)
    assert (run_dir / "inspect" / "selectivity_number.csv").exists()
    assert "selectivity for number" in format_selectivity(table, top=3)


def test_rank_selectivity_errors(run_dir):
    with pytest.raises(ReduceError, match="no prompt label 'colour'; labels of this run: answer, number, wrong"):
        rank_selectivity(run_dir, "colour")
    with pytest.raises(ReduceError, match="values: choose two of the label's values"):
        rank_selectivity(run_dir, "number", values=("singular", "dual"))
    with pytest.raises(ReduceError, match="no recorded site matches"):
        rank_selectivity(run_dir, "number", "blocks.*.mlp.hook_pre")
