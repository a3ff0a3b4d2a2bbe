"""Build the paper: runs → numbers, figures, tables → ``paper/paper.md`` (and ``paper/paper.html``).

``paper/paper.template.md`` holds the text; every number in it is a placeholder:

* ``{{KEY}}`` or ``{{KEY:FORMAT}}``: a value of ``paper/numbers.json`` (FORMAT is a Python format
  spec such as ``.3f`` or ``.0%``; floats default to two decimals);
* ``{{table:NAME}}``: ``paper/tables/NAME.md``.

A placeholder without a value is an error, and so is a digit in the template's own text outside
placeholders and citation labels (:func:`hand_typed_numbers`), so the paper cannot drift from
its runs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from reduce.store import atomic_write, write_json

from .runs import ROOT

PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
# Digits that label rather than measure: references to the sources' and this paper's own
# figures and tables, the seed documents, metric and baseline names, and model names.
CITATION_LABELS = re.compile(r"\b(?:Table|Figure|Section|Appendix) \d+\b|\bseed[ -]00\d\b|\btop-1\b|\bRS\d\b|\bGPT-2\b|\bMiniLM-L6-v2\b", re.IGNORECASE)


class PaperError(ValueError):
    """The template and the numbers disagree (a missing value, a hand-typed number)."""


def format_value(value, spec: str | None) -> str:
    if isinstance(value, bool):
        raise PaperError(f"{value!r} is a flag, not something to print")
    if spec:
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def fill(template: str, numbers: dict, tables: dict[str, str]) -> str:
    """The template with every placeholder replaced; raises :class:`PaperError` listing every one without a value."""
    missing = []

    def replace(match):
        name = match.group(1)
        if name.startswith("table:"):
            table = tables.get(name.removeprefix("table:"))
            if table is None:
                missing.append(name)
                return match.group(0)
            return table.rstrip()
        key, _, spec = name.partition(":")
        value = numbers.get(key.strip())
        if value is None:
            missing.append(name)
            return match.group(0)
        try:
            return format_value(value, spec.strip() or None)
        except (ValueError, TypeError) as error:
            raise PaperError(f"{{{{{name}}}}}: cannot format {value!r} as {spec!r}: {error}") from None

    filled = PLACEHOLDER.sub(replace, template)
    if missing:
        raise PaperError("placeholders without a value: " + ", ".join(f"{{{{{name}}}}}" for name in dict.fromkeys(missing)))
    return filled


def hand_typed_numbers(template: str) -> list[str]:
    """The lines of the template that hold a digit outside placeholders and citation labels."""
    offending = []
    for line in template.splitlines():
        text = CITATION_LABELS.sub("", PLACEHOLDER.sub("", line))
        if re.search(r"[0-9]", text):
            offending.append(line.strip())
    return offending


def cited_numbers(template: str, numbers: dict) -> dict:
    """The values the template cites, by key."""
    keys = [m.group(1).partition(":")[0].strip() for m in PLACEHOLDER.finditer(template) if not m.group(1).startswith("table:")]
    return {key: numbers[key] for key in dict.fromkeys(keys)}


def clear_generated(folder: Path, keep: set[Path]) -> None:
    """Remove files of a generated folder that this build did not write (a renamed figure must not linger)."""
    for path in folder.iterdir():
        if path.is_file() and path not in keep:
            path.unlink()


def build(runs: Path, paper: Path, *, log=sys.stderr) -> Path:
    """Everything: runs (made if missing), numbers.json, figures, tables, paper.md and paper.html."""
    from .runs import ensure_runs, ensure_universality

    template_path = paper / "paper.template.md"
    check_template(template_path)  # before hours of runs, not after
    run_dirs, stopped = ensure_runs(runs, log=log)
    universality_dirs = ensure_universality(runs, log=log)

    # Imported after the runs, which can take hours: the build reads the code and the template as they are now.
    from reduce.report import markdown_to_html

    from .figures import write_figures
    from .numbers import collect_numbers
    from .tables import write_tables

    template = check_template(template_path)
    numbers = collect_numbers(run_dirs, universality_dirs)
    figures = write_figures(run_dirs, universality_dirs, paper / "figures")
    tables = write_tables(numbers, run_dirs, universality_dirs, paper / "tables")
    clear_generated(paper / "figures", {path.resolve() for path in figures})
    clear_generated(paper / "tables", {(paper / "tables" / f"{name}.md").resolve() for name in tables})
    text = fill(template, numbers, tables)
    write_json(paper / "numbers.json", {"cited": cited_numbers(template, numbers), "all": numbers})
    with atomic_write(paper / "paper.md") as handle:
        handle.write(text)
    title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("# ")), "paper")
    with atomic_write(paper / "paper.html") as handle:
        handle.write(markdown_to_html(text, base_dir=paper, title=title))
    for key, reason in stopped.items():
        print(f"analyses: {key} stopped early, the paper reports what it has: {reason}", file=log)
    print(f"analyses: wrote {paper / 'paper.md'}, {paper / 'paper.html'}, {len(figures)} figures, {len(tables)} tables, {len(numbers)} numbers", file=log)
    return paper / "paper.md"


def check_template(path: Path) -> str:
    """The template's text; a :class:`PaperError` if it holds a number typed by hand."""
    template = path.read_text()
    typed = hand_typed_numbers(template)
    if typed:
        raise PaperError(f"{path}: numbers typed by hand (make them placeholders):\n  " + "\n  ".join(typed))
    return template


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analyses", description="Regenerate every figure, table and number of the paper from the runs (running what is missing).")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the runs live (default: runs/)")
    parser.add_argument("--paper", type=Path, default=ROOT / "paper", help="the paper folder with paper.template.md (default: paper/)")
    args = parser.parse_args(argv)
    try:
        build(args.runs.resolve(), args.paper.resolve())
    except PaperError as error:
        print(f"analyses: error: {error}", file=sys.stderr)
        return 2
    return 0
