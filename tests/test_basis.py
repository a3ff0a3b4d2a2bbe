import json

import numpy as np
import pytest

from reduce.basis import Constant, Identity, LogRaisedCosine, TwoSided, as_basis, basis_from_dict, parse_basis


def test_log_raised_cosine_bumps_peak_at_log_spaced_centres():
    points = np.arange(0, 200)
    values = LogRaisedCosine(6, stretch=2.0).evaluate(points)
    assert values.shape == (200, 6)
    assert values.min() >= 0 and values.max() == pytest.approx(1.0, abs=1e-3)
    peaks = points[values.argmax(axis=0)]
    assert peaks[0] == 0 and peaks[-1] == 199
    # equally spaced in log(x + stretch) (up to rounding to integer points): gaps grow geometrically
    spacing = (np.log(199 + 2.0) - np.log(2.0)) / 5
    assert np.allclose(np.diff(np.log(peaks + 2.0)), spacing, atol=0.04)
    assert np.all(np.diff(np.diff(peaks)) > 0)


def test_width_one_is_a_partition_of_unity_and_one_basis_is_constant():
    lags = np.arange(0, 30)
    assert np.allclose(LogRaisedCosine(7, width=1.0).evaluate(lags).sum(axis=1), 1.0)
    assert np.array_equal(LogRaisedCosine(1).evaluate(lags), np.ones((30, 1)))
    wide = LogRaisedCosine(7, width=2.0).evaluate(lags)
    assert np.all(wide.sum(axis=1) > 1.0), "wider bumps overlap more than a partition of unity"


def test_fixed_domain_evaluates_any_subset_consistently():
    basis = LogRaisedCosine(5, domain=(1, 12))
    grid = np.arange(1, 13)
    assert np.allclose(basis.evaluate(grid)[[2, 7]], basis.evaluate(np.array([3, 8])))
    inferred = LogRaisedCosine(5).evaluate(np.array([3, 8]))
    assert not np.allclose(inferred, basis.evaluate(np.array([3, 8]))), "without a domain the range of the points is used"


def test_negative_points_need_two_sided():
    with pytest.raises(ValueError, match="TwoSided"):
        LogRaisedCosine(4).evaluate(np.arange(-3, 4))
    signed = np.arange(-5, 6)
    values = TwoSided(LogRaisedCosine(3)).evaluate(signed)
    assert values.shape == (11, 6)
    inner = LogRaisedCosine(3).evaluate(np.abs(signed))
    ahead = signed >= 0
    assert np.array_equal(values[ahead, :3], inner[ahead]) and not values[ahead, 3:].any()
    assert np.array_equal(values[~ahead, 3:], inner[~ahead]) and not values[~ahead, :3].any()


def test_identity_and_constant():
    assert np.array_equal(Identity().evaluate(np.arange(4) + 10), np.eye(4))
    assert np.array_equal(Constant().evaluate(np.arange(3)), np.ones((3, 1)))


@pytest.mark.parametrize("basis", [LogRaisedCosine(6, stretch=0.5, width=1.5, domain=(0, 20)), Identity(), Constant(), TwoSided(LogRaisedCosine(4))])
def test_dict_round_trip_through_json(basis):
    spec = json.loads(json.dumps(basis.to_dict()))
    assert basis_from_dict(spec) == basis


def test_parse_basis_spellings_and_errors():
    assert parse_basis("log-cosine:8") == LogRaisedCosine(8)
    assert parse_basis("log-cosine:8:2.5") == LogRaisedCosine(8, stretch=2.5)
    assert parse_basis("identity") == Identity()
    assert parse_basis("constant") == Constant()
    assert parse_basis("two-sided:log-cosine:4") == TwoSided(LogRaisedCosine(4))
    for bad in ("log-cosine", "log-cosine:x", "log-cosine:0", "spline:4", "identity:3", "log-cosine:4:1:2"):
        with pytest.raises(ValueError, match="bad basis"):
            parse_basis(bad)


def test_as_basis_accepts_a_basis_a_spelling_or_a_count():
    assert as_basis(Identity()) == Identity()
    assert as_basis("two-sided:identity") == TwoSided(Identity())
    assert as_basis(5) == LogRaisedCosine(5) == as_basis(np.int64(5))
    for bad in (True, 2.5, None):
        with pytest.raises(ValueError, match="bad basis"):
            as_basis(bad)
