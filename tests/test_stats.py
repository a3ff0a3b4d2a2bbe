import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as distributions

from reduce.stats import RunningStats


def accumulate(batches, bins=64):
    stats = RunningStats(batches[0].shape[1], bins)
    for batch in batches:
        stats.update(torch.as_tensor(batch))
    return stats


def assert_matches_numpy(stats, values):
    """Moments, extremes and every unit's histogram against numpy on the same (float64) values."""
    values = np.asarray(values, dtype=np.float64)
    np.testing.assert_array_equal(stats.count.numpy(), len(values))
    np.testing.assert_allclose(stats.mean.numpy(), values.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.var.numpy(), values.var(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(stats.min.numpy(), values.min(0))
    np.testing.assert_array_equal(stats.max.numpy(), values.max(0))
    edges = stats.edges.numpy()
    for unit in range(values.shape[1]):
        expected, _ = np.histogram(values[:, unit], bins=edges[unit])
        np.testing.assert_array_equal(stats.histogram[unit].numpy(), expected, err_msg=f"unit {unit}")


def test_matches_numpy_when_the_first_batch_is_unrepresentative():
    rng = np.random.default_rng(0)
    scales = np.geomspace(1e-3, 1e3, 12).astype(np.float32)
    # The first batch sees a sliver of each unit's range; later ones reach 1e4 times further.
    batches = [rng.normal(0, 1e-4, (5, 12)).astype(np.float32) * scales]
    batches += [(rng.standard_t(3, (200, 12)) * scales + rng.normal(0, 1, 12) * scales).astype(np.float32) for _ in range(6)]
    stats = accumulate(batches, bins=64)
    assert_matches_numpy(stats, np.concatenate(batches))
    data = np.concatenate(batches)
    span = data.max(0) - data.min(0)
    # Window fitted to the whole range: at most ~four times the width of bins fitted exactly.
    assert np.all(stats.bin_width.numpy() <= 4 * span / 64)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=2, max_size=60),
    st.lists(st.integers(1, 20), min_size=1, max_size=6),
)
def test_any_batching_gives_numpy_histogram_and_moments(values, sizes):
    data = np.array(values, dtype=np.float32).reshape(-1, 2) if len(values) % 2 == 0 else np.array(values[:-1], dtype=np.float32).reshape(-1, 2)
    cuts = np.cumsum(sizes)
    batches = [b for b in np.split(data, cuts[cuts < len(data)]) if len(b)]
    assert_matches_numpy(accumulate(batches, bins=8), data)


def test_a_batch_longer_than_a_uint16_tally_across_several_tiles_matches_numpy():
    """Counts pass through a uint16 tally per tile of units; a unit with every value in one bin
    must still count them all, in each tile and in the last, partial group of units."""
    rng = np.random.default_rng(4)
    data = rng.normal(0, 1, (70_000, 70)).astype(np.float32)
    data[:, 3] = 0.5  # one bin holds more than a uint16 can
    data[:, 69] = np.float32(2.0) ** -20
    assert_matches_numpy(accumulate([data], bins=32), data)


def test_merge_equals_one_pass_and_concat_stacks_units():
    rng = np.random.default_rng(1)
    left = rng.normal(0, 1, (300, 6))
    right = rng.normal(5, 20, (200, 6))
    merged = accumulate([left[:100], left[100:]]).merge(accumulate([right]))
    one_pass = accumulate([left, right])
    assert_matches_numpy(merged, np.concatenate([left, right]))
    np.testing.assert_array_equal(merged.histogram.numpy(), one_pass.histogram.numpy())
    np.testing.assert_array_equal(merged.edges.numpy(), one_pass.edges.numpy())
    both = RunningStats.concat([accumulate([left]), accumulate([right])])
    assert both.n_units == 12 and both.count.tolist() == [300] * 6 + [200] * 6
    for part, (rows, values) in enumerate([(slice(0, 6), left), (slice(6, 12), right)]):
        alone = accumulate([values])
        np.testing.assert_array_equal(both.histogram[rows].numpy(), alone.histogram.numpy(), err_msg=f"part {part}")
        np.testing.assert_array_equal(both.peak()[rows].numpy(), alone.peak().numpy())


def test_merge_into_empty_units_and_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.gamma(2.0, 1.0, (400, 5))
    empty = RunningStats(5, 64)
    empty.merge(accumulate([data]))
    assert_matches_numpy(empty, data)
    units = {"site": ("unit", ["blocks.0.mlp.hook_post"] * 5), "layer": ("unit", [0] * 5), "kind": ("unit", ["mlp"] * 5), "index": ("unit", np.arange(5))}
    dataset = empty.to_dataset(units)
    assert dict(dataset.sizes) == {"unit": 5, "bin": 64} and list(dataset.index.values) == list(range(5))
    empty.save(tmp_path / "stats.nc", units)
    restored = RunningStats.load(tmp_path / "stats.nc")
    assert_matches_numpy(restored, data)
    np.testing.assert_allclose(restored.peak().numpy(), empty.peak().numpy())
    more = rng.gamma(2.0, 3.0, (100, 5))
    assert_matches_numpy(restored.update(torch.as_tensor(more)), np.concatenate([data, more]))


def test_unseen_constant_and_half_precision_units():
    stats = RunningStats(3, 16)
    assert torch.isnan(stats.mean).all() and torch.isnan(stats.peak()).all()
    constant = torch.tensor([[2.5, 0.0, 1.0]] * 10)
    constant[:, 2] = torch.linspace(-1, 1, 10)
    stats.update(constant)
    assert stats.peak("refined")[0] == 2.5 and stats.peak("refined")[1] == 0.0
    assert stats.var[0] == 0 and stats.histogram[0].count_nonzero() == 1
    half = torch.randn(50, 4).to(torch.bfloat16)
    assert_matches_numpy(accumulate([half]), half.float().numpy())


def _sample(rng, draw, n, units):
    return np.stack([draw(rng, n) for _ in range(units)], 1)


def _laplace_mixture(rng, n):
    return np.where(rng.random(n) < 0.7, rng.laplace(0, 0.1, n), rng.normal(1, 0.5, n))


def _mode(density, low, high):
    grid = np.linspace(low, high, 400_001)
    return grid[np.argmax(density(grid))]


def test_peak_of_a_skewed_mixture_naive_within_a_bin_refined_much_closer():
    rng = np.random.default_rng(3)
    units = 40
    shifts = rng.uniform(0, 1, units)
    data = _sample(rng, _laplace_mixture, 20_000, units) + shifts
    stats = accumulate([data[i : i + 5000] for i in range(0, len(data), 5000)], bins=64)
    mode = _mode(lambda g: 0.7 * distributions.laplace(0, 0.1).pdf(g) + 0.3 * distributions.norm(1, 0.5).pdf(g), -1, 1) + shifts
    width = stats.bin_width.numpy()
    naive = np.abs(stats.peak("naive").numpy() - mode)
    refined = np.abs(stats.peak("refined").numpy() - mode)
    assert np.all(naive <= width)
    assert refined.mean() < naive.mean() / 3 and refined.mean() < width.mean() / 8


def test_peak_at_an_edge_of_the_data_is_that_edge():
    rng = np.random.default_rng(4)
    gelu = lambda x: x * distributions.norm.cdf(x)  # noqa: E731
    inputs = np.where(rng.random((20_000, 8)) < 0.8, rng.normal(-1, 1, (20_000, 8)), rng.normal(2, 1, (20_000, 8)))
    stats = accumulate([gelu(inputs)], bins=256)
    minimum = gelu(np.linspace(-1, -0.5, 100_001)).min()
    refined = np.abs(stats.peak("refined").numpy() - minimum)
    naive = np.abs(stats.peak("naive").numpy() - minimum)
    assert np.all(refined < 1e-3) and np.all(refined < naive)


def test_rejects_bad_shapes_and_bins():
    with pytest.raises(ValueError, match="even"):
        RunningStats(3, bins=7)
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        RunningStats(3).update(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="same units"):
        RunningStats(3).merge(RunningStats(4))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("row", [0, 299])
def test_a_non_finite_value_is_rejected_and_changes_nothing(bad, row):
    rng = np.random.default_rng(2)
    stats = accumulate([rng.normal(0, 1, (50, 3)).astype(np.float32)], bins=16)
    before = {name: getattr(stats, name).clone() for name in ("count", "_mean", "_m2", "_min", "_max", "histogram", "level", "start")}
    batch = rng.normal(0, 30, (300, 3)).astype(np.float32)  # would move every window
    batch[row, 1] = bad
    with pytest.raises(ValueError, match="finite"):
        stats.update(batch)
    for name, value in before.items():
        assert torch.equal(getattr(stats, name), value), name
