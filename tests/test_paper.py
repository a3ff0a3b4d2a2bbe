"""The paper's build: placeholders filled from numbers only, no hand-typed numbers, the committed paper in sync."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analyses.numbers import degradation_numbers, flatten, relation
from analyses.paper import PaperError, cited_numbers, fill, hand_typed_numbers

PAPER = Path(__file__).resolve().parent.parent / "paper"


def test_placeholders_take_values_formats_and_tables():
    numbers = {"sva.r2": 0.93514, "sva.prompts": 520, "sva.best": "Peak"}
    text = fill("R² {{sva.r2:.3f}} ({{ sva.r2 }}) on {{sva.prompts}} prompts, best {{sva.best}}\n{{table:t}}\n", numbers, {"t": "| a |\n|---|\n"})
    assert text == "R² 0.935 (0.94) on 520 prompts, best Peak\n| a |\n|---|\n"


def test_every_placeholder_without_a_value_is_reported():
    with pytest.raises(PaperError) as error:
        fill("{{a}} {{b:.2f}} {{table:c}} {{a}} {{d}}", {"d": None}, {})
    message = str(error.value)
    assert "{{a}}" in message and "{{b:.2f}}" in message and "{{table:c}}" in message and "{{d}}" in message
    assert message.count("{{a}}") == 1


def test_a_value_that_cannot_take_its_format_is_an_error():
    with pytest.raises(PaperError, match="cannot format"):
        fill("{{name:.2f}}", {"name": "Peak"}, {})


def test_hand_typed_numbers_are_found_outside_placeholders_and_citations():
    template = "R² = {{sva.r2}} as in Table 2 and Figure 3 of seed 004 for GPT-2.\nWe got 0.93 here.\nand 97% there\n"
    assert hand_typed_numbers(template) == ["We got 0.93 here.", "and 97% there"]


def test_the_template_has_no_hand_typed_number():
    assert hand_typed_numbers((PAPER / "paper.template.md").read_text()) == []


def test_cited_numbers_are_the_placeholders_values():
    assert cited_numbers("{{a:.1f}} {{b}} {{table:t}} {{a}}", {"a": 1.0, "b": "x", "c": 3}) == {"a": 1.0, "b": "x"}


def test_flatten_nests_keys_with_dots():
    assert flatten("sva", {"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]}) == {"sva.a.b": 1, "sva.a.c.d": None, "sva.e": [1, 2]}


def test_the_least_degrading_baseline_depends_on_the_metric_direction():
    import pandas as pd

    rows = [
        ("Top1 Accuracy", "Baseline", "", 50.0, 0.0),
        ("Top1 Accuracy", "50% Pruning", "Zero", 40.0, 1.0),
        ("Top1 Accuracy", "50% Pruning", "Peak", 45.0, 1.0),
        ("Cross-Entropy Loss", "Baseline", "", 1.0, 0.0),
        ("Cross-Entropy Loss", "50% Pruning", "Zero", 1.5, 0.1),
        ("Cross-Entropy Loss", "50% Pruning", "Peak", 1.7, 0.1),
    ]
    numbers = degradation_numbers(pd.DataFrame(rows, columns=["metric", "pruning", "baseline", "mean", "sd"]).assign(model="m"))
    assert numbers["degradation.top1.clean"] == 50.0
    assert numbers["degradation.top1.50.peak_naive"] == 45.0 and numbers["degradation.top1.50.zero.sd"] == 1.0
    assert numbers["degradation.top1.50.best"] == "Peak"  # higher accuracy is better
    assert numbers["degradation.cross_entropy.50.best"] == "Zero"  # lower loss is better


@pytest.mark.skipif(not (PAPER / "numbers.json").exists(), reason="the paper has not been built yet (make paper)")
def test_the_committed_paper_is_the_template_filled_with_the_committed_numbers():
    numbers = json.loads((PAPER / "numbers.json").read_text())
    tables = {path.stem: path.read_text() for path in (PAPER / "tables").glob("*.md")}
    template = (PAPER / "paper.template.md").read_text()
    assert (PAPER / "paper.md").read_text() == fill(template, numbers["all"], tables), "paper.md is stale: run `make paper`"
    assert numbers["cited"] == cited_numbers(template, numbers["all"])
    for figure in (PAPER / "paper.md").read_text().split("](figures/")[1:]:
        assert (PAPER / "figures" / figure.split(")")[0]).is_file()


def test_comparison_words_follow_the_quoted_precision():
    assert relation(0.9349, 0.99) == "below"
    assert relation(0.9941, 0.99) == "level with"  # both read 0.99 in the text
    assert relation(0.996, 0.99) == "above"
    assert relation(None, 0.99) is None
