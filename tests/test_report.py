"""The run report: built from a real (tiny) run, every section present, figures embedded, deterministic."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from analyses.screenshot import find_browser, screenshot
from reduce.condition import dumps_toml
from reduce.errors import ReduceError
from reduce.report import REPORT_HTML, REPORT_MARKDOWN, highlighted, markdown_to_html, number, slug, write_report

CONDITIONS = Path(__file__).resolve().parent.parent / "conditions"
SECTIONS = ("Condition", "Reduced model", "Unit-level circuit", "Ablation baselines", "Counterfactual validation", "Neuron analysis", "Timings")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """sva_tiny through the whole pipeline, with fewer ablations and refits so that it takes seconds."""
    from reduce.pipeline import run

    folder = tmp_path_factory.mktemp("report")
    data = tomllib.loads((CONDITIONS / "sva_tiny.toml").read_text())
    data["ablation"] = {**data.get("ablation", {}), "baselines": ["zero", "peak"], "plans": ["random", "circuit"], "fractions": [0.0, 0.5], "seeds": [0, 1], "max_eval_sequences": 4}
    data["fit"] = {**data["fit"], "bootstrap": 2, "folds": 2, "max_lag": 4}
    condition = folder / "sva_tiny_fast.toml"
    condition.write_text(dumps_toml(data))
    run(condition, folder / "run", progress=False, log=io.StringIO())
    return folder / "run"


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_the_pipeline_writes_both_reports_with_every_section(run_dir):
    markdown = (run_dir / REPORT_MARKDOWN).read_text()
    page = (run_dir / REPORT_HTML).read_text()
    for title in SECTIONS:
        assert f"\n## {title}\n" in markdown
        assert f'<h2 id="{slug(title)}">{title}</h2>' in page
        assert f'href="#{slug(title)}"' in page


def test_every_figure_is_embedded_and_nothing_is_fetched(run_dir):
    markdown = (run_dir / REPORT_MARKDOWN).read_text()
    page = (run_dir / REPORT_HTML).read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    for expected in ("figures/spatial.png", "figures/temporal.png", "figures/filter.png", "figures/history.png", "figures/nonlinearity.png", "figures/degradation.png", "figures/validation_scatter.png"):
        assert expected in linked
    assert sum(1 for path in linked if path.startswith("inspect/")) == 3  # one histogram per analysed unit
    images = embedded_images(page)
    assert len(images) == len(linked) == page.count("<img ")
    assert [image == (run_dir / path).read_bytes() for image, path in zip(images, linked)] == [True] * len(linked)
    assert all(image.startswith(PNG_SIGNATURE) for image in images)
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page), "the page must not load anything"
    assert "<style>" in page and "<script" not in page


def test_numbers_come_from_the_run_files(run_dir):
    markdown = (run_dir / REPORT_MARKDOWN).read_text()
    fit = json.loads((run_dir / "fit.json").read_text())
    validation = json.loads((run_dir / "validation.json").read_text())
    metric = fit["metric"]
    assert f"= {number(fit['held_out'][metric])} (95% CI {number(fit['interval'][metric][0])}–{number(fit['interval'][metric][1])}, {fit['test_prompts']} held-out prompts)" in markdown
    assert f"{fit['circuit']['selected_synapses']} of {fit['circuit']['candidates']} candidate synapses" in markdown
    from reduce.report import baseline_label

    assert f"**Most faithful baseline: {baseline_label(validation['most_faithful_baseline'])}**" in markdown
    validation_part = markdown.split("## Counterfactual validation")[1].split("## Neuron analysis")[0]
    for baseline, scores in validation["baselines"].items():
        rows = [line for line in validation_part.splitlines() if line.startswith(f"| {baseline_label(baseline)} | direct |")]
        assert len(rows) == 1
        assert number(scores["mean_abs_target_change"]) in rows[0]
    for name, control in fit["controls"].items():
        assert f"| `{name}` |" in markdown and number(control["metric"]) in markdown


def test_analysed_units_show_their_top_token_highlighted(run_dir):
    import pandas as pd

    page = (run_dir / REPORT_HTML).read_text()
    tables = sorted((run_dir / "inspect").glob("*.csv"))
    assert len(tables) == 3
    for table in tables:
        top = pd.read_csv(table).iloc[0]
        token = re.search(r"\[\[(.*?)\]\]", top["context"]).group(1)
        assert f"<mark>{token}</mark>" in page
    assert page.count("<mark>") >= 3


def test_the_report_is_deterministic_and_timings_have_their_own_section(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "timings.json").write_text(json.dumps({"record": 1.25, "total": 4321.9}))
    html_path, markdown_path = write_report(copy)
    first = markdown_path.read_bytes(), html_path.read_bytes()
    assert write_report(copy) == (html_path, markdown_path)
    assert (markdown_path.read_bytes(), html_path.read_bytes()) == first
    body, timings = markdown_path.read_text().split("## Timings")
    assert "| record | 1.2 |" in timings and "| total | 4321.9 |" in timings
    assert "4321.9" not in body  # the only run-to-run variation stays in its section
    assert "4321.9" in html_path.read_text().split('id="timings"')[1]


def test_a_stage_that_did_not_run_is_named_and_a_missing_fit_is_an_error(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("validation.*", "ablations.zarr"))
    _, markdown_path = write_report(copy)
    text = markdown_path.read_text()
    assert "The validation stage did not run" in text and "The ablation stage did not run" in text
    (copy / "fit.json").unlink()
    with pytest.raises(ReduceError, match="fit.json"):
        write_report(copy)


def test_highlights_are_marked_and_prompt_text_is_escaped():
    cell = highlighted("a <b>|x [[c*d]] e_f")
    page = markdown_to_html(f"| prompt |\n|---|\n| {cell} |\n", base_dir=".", title="t")
    assert "<td>a &lt;b&gt;|x <mark>c*d</mark> e_f</td>" in page


def test_a_page_never_points_at_a_missing_image(tmp_path):
    with pytest.raises(ReduceError, match="missing.png"):
        markdown_to_html("![a figure](missing.png)\n", base_dir=tmp_path, title="t")


@pytest.mark.skipif(find_browser() is None, reason="no Chromium-family browser (apt-get install -y chromium)")
def test_the_page_renders_in_a_browser(run_dir, tmp_path):
    from PIL import Image

    shot = screenshot(run_dir / REPORT_HTML, tmp_path / "report.png", width=1000, height=1600)
    image = Image.open(shot).convert("L")
    assert image.size == (1000, 1600)
    low, high = image.getextrema()
    assert high - low > 100  # text and figures drawn, not a blank page
