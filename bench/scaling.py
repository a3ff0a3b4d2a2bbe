"""How ``reduce record`` scales: time and peak memory against the prompt count and the number of units.

Every point is one ``reduce record`` of the zoo default model on held-out filler text of the zoo's
language (:func:`reduce.zoo.corpus.heldout_filler`, a fixed number of words per prompt), run in a
process of its own by :mod:`bench.record_probe` (seconds inside the command, peak RSS from the
kernel's accounting of that process):

- prompts x1, x4, x16 with every MLP and attention site of all layers;
- units: the sites of the first 1, 2 and all 4 layers, at the x1 prompt count;
- prompts x10, for ``peak_memory_growth`` = peak RSS at x10 prompts over peak RSS at x1 (goal <= 1.2).

Each axis gets a fitted log-log exponent (slope of log y on log x; 1 = linear, 0 = flat), and
``bench/results/scaling.png`` (seaborn) shows the points and the fits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .workloads import ROOT, ZOO_DEFAULT

PROMPT_FACTORS = (1, 4, 16)
GROWTH_FACTOR = 10
LAYER_COUNTS = (1, 2, 4)
WORDS_PER_PROMPT = 15
BATCH_SIZE = 64

CONDITION = """name = "bench_{name}"
description = "bench.scaling: reduce record of {prompts} filler prompts, sites of layers 0..{last_layer}"
[model]
name = "zoo:{zoo}"
[prompts]
file = "{prompt_file}"
[target]
kind = "neuron"
site = "blocks.0.mlp.hook_post"
unit = 0
position = "last"
[record]
sites = [{sites}]
batch_size = {batch_size}
"""


def _write_condition(folder: Path, name: str, texts: list[str], layers: int) -> Path:
    prompt_file = folder / f"{name}.txt"
    prompt_file.write_text("\n".join(texts) + "\n")
    sites = ", ".join(f'"blocks.{layer}.mlp.hook_post", "blocks.{layer}.attn.hook_z"' for layer in range(layers))
    path = folder / f"{name}.toml"
    path.write_text(CONDITION.format(name=name, prompts=len(texts), last_layer=layers - 1, zoo=ZOO_DEFAULT, prompt_file=prompt_file.name, sites=sites, batch_size=BATCH_SIZE))
    return path


def plan_runs(base_prompts: int, folder: Path) -> list[dict]:
    """Every distinct (prompts, layers) point: prompt factors and the growth factor at all layers, layer counts at x1."""
    from reduce.zoo.corpus import heldout_filler

    texts = heldout_filler(base_prompts * max(*PROMPT_FACTORS, GROWTH_FACTOR), words=WORDS_PER_PROMPT)
    points = sorted({(factor, max(LAYER_COUNTS)) for factor in (*PROMPT_FACTORS, GROWTH_FACTOR)} | {(1, layers) for layers in LAYER_COUNTS})
    runs = []
    for factor, layers in points:
        name = f"p{factor}x_l{layers}"
        condition = _write_condition(folder, name, texts[: base_prompts * factor], layers)
        runs.append({"name": name, "condition": str(condition), "out": str(folder / "runs" / name), "prompts": base_prompts * factor, "prompt_factor": factor, "layers": layers})
    return runs


class ProbeRun:
    """The :mod:`bench.record_probe` process measuring the planned runs; :meth:`results` waits for it."""

    def __init__(self, base_prompts: int, threads: int):
        from reduce.zoo.corpus import heldout_filler

        self.threads = threads
        self._scratch = tempfile.TemporaryDirectory(prefix="bench-scaling-")
        folder = Path(self._scratch.name)
        self.runs = plan_runs(base_prompts, folder)
        warmup = {"condition": str(_write_condition(folder, "warmup", heldout_filler(4, words=WORDS_PER_PROMPT), max(LAYER_COUNTS))), "out": str(folder / "runs" / "warmup")}
        spec, self._result = folder / "spec.json", folder / "result.json"
        spec.write_text(json.dumps({"warmup": warmup, "runs": self.runs}))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "REDUCE_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self._log = (folder / "probe.log").open("w+")
        self._process = subprocess.Popen([sys.executable, "-m", "bench.record_probe", str(spec), str(self._result)], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def results(self) -> list[dict]:
        """The runs with their measurements (after a 4-prompt warm-up recording in the probe)."""
        try:
            returncode = self._process.wait()
            self._log.seek(0)
            log = self._log.read()[-2000:]
            if not self._result.exists():
                raise RuntimeError(f"bench.record_probe failed ({returncode}): {log}")
            measured = {row["name"]: row for row in json.loads(self._result.read_text())["runs"]}
            failed = [name for name, row in measured.items() if row["returncode"] != 0]
            if failed:
                raise RuntimeError(f"reduce record failed for {failed}: {log}")
            return [{**run, **measured[run["name"]]} for run in self.runs]
        finally:
            self._log.close()
            self._scratch.cleanup()


def loglog_exponent(x, y) -> float:
    """Slope of log y against log x (least squares)."""
    return float(np.polyfit(np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float)), 1)[0])


def _axis(runs: list[dict], key: str, values, fixed: dict, units_per_layer: int) -> dict:
    chosen = sorted((run for run in runs if run[key] in values and all(run[k] == v for k, v in fixed.items())), key=lambda run: run[key])
    x = [run["prompts"] if key == "prompt_factor" else run["layers"] * units_per_layer for run in chosen]
    return {
        "x_name": "prompts" if key == "prompt_factor" else "units",
        "x": x,
        "seconds": [run["seconds"] for run in chosen],
        "peak_rss_mb": [run["peak_rss_mb"] for run in chosen],
        "record_rss_increase_mb": [run["record_rss_increase_mb"] for run in chosen],
        "time_exponent": loglog_exponent(x, [run["seconds"] for run in chosen]),
        "peak_rss_exponent": loglog_exponent(x, [run["peak_rss_mb"] for run in chosen]),
        "rss_increase_exponent": loglog_exponent(x, [max(run["record_rss_increase_mb"], 1.0) for run in chosen]),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.ticker import FormatStrFormatter, NullFormatter
    import seaborn as sns

    rows = []
    for axis_name, axis in (("prompts", result["vs_prompts"]), ("units", result["vs_units"])):
        for x, seconds, rss in zip(axis["x"], axis["seconds"], axis["peak_rss_mb"]):
            rows.append({"axis": axis_name, "x": x, "measure": "time (s)", "value": seconds})
            rows.append({"axis": axis_name, "x": x, "measure": "peak RSS (MB)", "value": rss})
    frame = pd.DataFrame(rows)
    sns.set_theme(style="whitegrid", context="notebook")
    figure, axes = plt.subplots(2, 2, figsize=(10, 8))
    exponents = {("prompts", "time (s)"): "time_exponent", ("prompts", "peak RSS (MB)"): "peak_rss_exponent", ("units", "time (s)"): "time_exponent", ("units", "peak RSS (MB)"): "peak_rss_exponent"}
    for row, measure in enumerate(("time (s)", "peak RSS (MB)")):
        for column, axis_name in enumerate(("prompts", "units")):
            ax = axes[row, column]
            data = frame[(frame["axis"] == axis_name) & (frame["measure"] == measure)]
            sns.scatterplot(data=data, x="x", y="value", ax=ax, s=60)
            axis = result[f"vs_{axis_name}"]
            exponent = axis[exponents[(axis_name, measure)]]
            x = np.asarray(data["x"], dtype=float)
            y = np.asarray(data["value"], dtype=float)
            intercept = np.mean(np.log(y) - exponent * np.log(x))
            grid = np.geomspace(x.min(), x.max(), 50)
            sns.lineplot(x=grid, y=np.exp(intercept) * grid**exponent, ax=ax, label=f"fit: exponent {exponent:.2f}")
            ax.set(xscale="log", yscale="log", xlabel=axis["x_name"], ylabel=measure, title=f"reduce record: {measure} vs {axis['x_name']}")
            # Plain numbers: the measured x values, and four y values spanning the data.
            ax.set_xticks(sorted(set(x)))
            ax.set_yticks(np.geomspace(y.min(), y.max(), 4) if y.max() > y.min() else [y.min()])
            for ticks in (ax.xaxis, ax.yaxis):
                ticks.set_major_formatter(FormatStrFormatter("%.4g"))
                ticks.set_minor_formatter(NullFormatter())
    figure.suptitle(f"reduce record on zoo:{ZOO_DEFAULT} ({result['words_per_prompt']} words per prompt, batch {BATCH_SIZE}, {result['threads']} thread(s))")
    figure.tight_layout()
    temporary = path.with_suffix(".png.tmp")
    figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
    os.replace(temporary, path)


def launch(quick: bool = False, threads: int = 1) -> ProbeRun:
    """Start measuring (in another process); :func:`summarise` the result when it is needed."""
    return ProbeRun(16 if quick else 256, threads)


def summarise(probe: ProbeRun, plot_path: Path | None = None) -> dict:
    runs = probe.results()
    units_per_layer = 512 + 128  # zoo default: d_mlp + n_heads * d_head
    full = max(LAYER_COUNTS)
    at = {(run["prompt_factor"], run["layers"]): run for run in runs}
    result = {
        "model": f"zoo:{ZOO_DEFAULT}",
        "base_prompts": at[(1, full)]["prompts"],
        "words_per_prompt": WORDS_PER_PROMPT,
        "batch_size": BATCH_SIZE,
        "threads": probe.threads,
        "runs": runs,
        "vs_prompts": _axis(runs, "prompt_factor", PROMPT_FACTORS, {"layers": full}, units_per_layer),
        "vs_units": _axis(runs, "layers", LAYER_COUNTS, {"prompt_factor": 1}, units_per_layer),
        "peak_memory_growth": at[(GROWTH_FACTOR, full)]["peak_rss_mb"] / at[(1, full)]["peak_rss_mb"],
        "peak_memory_growth_prompts": [at[(1, full)]["prompts"], at[(GROWTH_FACTOR, full)]["prompts"]],
        "record_rss_increase_growth": max(at[(GROWTH_FACTOR, full)]["record_rss_increase_mb"], 1.0) / max(at[(1, full)]["record_rss_increase_mb"], 1.0),
    }
    if plot_path is not None:
        plot(result, plot_path)
        result["plot"] = str(plot_path.relative_to(ROOT)) if plot_path.is_relative_to(ROOT) else str(plot_path)
    return result


def run(quick: bool = False, plot_path: Path | None = None, threads: int = 1) -> dict:
    return summarise(launch(quick, threads), plot_path)
