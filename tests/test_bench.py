"""The benchmark package on a tiny size: the shape of what it reports, never how fast anything is."""

import json

from bench.peak import peak_speedup, synthetic_activations
from bench.report import document, write_json
from bench.timing import interleaved


def test_interleaved_rotates_the_order_and_times_every_repetition():
    calls = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotating rounds
    assert timings.repetitions == 3
    summary = timings.ratio_summary("a", "b")
    assert set(summary) == {"paired_median", "of_medians", "cpu", "numerator", "denominator"}
    assert summary["paired_median"] > 0


def test_peak_speedup_quick_path_writes_the_documented_json(tmp_path):
    result = peak_speedup(synthetic_activations(batches=3, tokens=32, units=16), repetitions=1)
    assert {"tokens", "units", "bins", "threads", "timings", "peak_speedup", "seed_stored_bytes", "streaming_state_bytes", "median_peak_distance_in_seed_bins"} <= set(result)
    assert (result["tokens"], result["units"], result["sites"]) == (96, 16, 1)
    assert result["peak_speedup"]["numerator"] == "seed_store_then_histc" and result["peak_speedup"]["denominator"] == "streaming"
    assert set(result["timings"]["median_s"]) == {"streaming", "seed_store_then_histc"}
    assert 0.0 <= result["share_of_units_within_one_seed_bin"] <= 1.0

    result["model"] = "synthetic"
    path = write_json(
        document(mode="quick", machine={"cpu_model": "test"}, settings={}, benchmarks={"peak": result}, errors={"glm": "not run here"}, started="", finished="", seconds=0.0),
        tmp_path / "latest.json",
    )
    saved = json.loads(path.read_text())
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: only the final file remains
    assert saved["ratios"]["peak_speedup"] == result["peak_speedup"]["paired_median"]
    rows = {row["ratio"]: row for row in saved["goals"]}
    assert rows["peak_speedup"]["goal"] == ">= 10" and isinstance(rows["peak_speedup"]["met"], bool)
    # Benchmarks that did not run are rows without a number, saying why.
    assert rows["glm_seconds_per_target"]["measured"] is None and "not run here" in rows["glm_seconds_per_target"]["note"]
    assert saved["ratios"]["record_vs_forward"] == {"all": {"not_measured": rows["record_vs_forward"]["note"]}}
