"""The model zoo: small causal LMs trained on :mod:`reduce.zoo.corpus`, shipped with the package.

Each model lives in ``weights/NAME/`` as a normal HuggingFace folder (loadable with
``AutoModelForCausalLM`` / ``AutoTokenizer``) with a ``card.json``; conditions name it
``zoo:NAME``. :data:`ZOO_SPECS` says how each was made, :func:`train` remakes one,
:func:`evaluate` recomputes a card's metrics from the shipped weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ReduceError
from .evaluate import THRESHOLDS
from .specs import ZOO_SPECS, ZooSpec, spec_for
from .train import WEIGHTS_DIR, train

__all__ = ["THRESHOLDS", "ZOO_SPECS", "ZooSpec", "evaluate", "format_zoo_table", "list_zoo", "read_card", "train", "zoo_path"]


def zoo_path(name: str, *, source=None, field: str | None = "model.name") -> Path:
    """The folder of zoo model ``name``; a :class:`ReduceError` naming ``source``/``field`` if unknown or missing."""
    spec_for(name, source=source, field=field)
    folder = WEIGHTS_DIR / name
    if not (folder / "model.safetensors").is_file():
        raise ReduceError(
            f"zoo model {name!r} has no weights in {folder}; run reduce.zoo.train({name!r}) to make them",
            file=source,
            field=field,
        )
    return folder


def read_card(name: str) -> dict:
    """The ``card.json`` of zoo model ``name``: its spec, config, training record and held-out metrics."""
    return json.loads((zoo_path(name, field=None) / "card.json").read_text())


def list_zoo() -> list[dict]:
    """One row per shipped model: name, family, shape, parameters, size, metrics, training time."""
    rows = []
    for name, spec in ZOO_SPECS.items():
        folder = WEIGHTS_DIR / name
        if not (folder / "card.json").is_file():
            continue
        info = read_card(name)
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "layers": spec.layers,
                "d_model": spec.d_model,
                "parameters": info["parameters"],
                "size_mb": round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 2),
                "steps": spec.steps,
                "wall_time_s": info["wall_time_s"],
                **info["metrics"],
            }
        )
    return rows


_COLUMNS = (
    ("name", "{}"), ("family", "{}"), ("layers", "{}"), ("d_model", "{}"), ("parameters", "{:,}"),
    ("size_mb", "{:.2f}"), ("steps", "{}"), ("wall_time_s", "{:.0f}"), ("sva_simple", "{:.3f}"),
    ("sva_pp", "{:.3f}"), ("sva_rc", "{:.3f}"), ("twohop", "{:.3f}"), ("filler_top1", "{:.3f}"), ("filler_ce", "{:.3f}"),
)  # fmt: skip


def format_zoo_table(rows: list[dict] | None = None) -> str:
    """A plain-text table of :func:`list_zoo` for ``reduce zoo list``, newline-terminated."""
    rows = list_zoo() if rows is None else rows
    cells = [[header for header, _ in _COLUMNS]] + [[fmt.format(row[key]) for key, fmt in _COLUMNS] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    total = sum(row["size_mb"] for row in rows)
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], f"{len(rows)} models, {total:.1f} MB", ""])


def evaluate(path_or_name, sample: int | None = None) -> dict:
    """Recompute a card's metrics from saved weights (a zoo name or a model folder)."""
    from ..models import load_model
    from .evaluate import evaluate_model

    target = str(path_or_name)
    if target in ZOO_SPECS:
        folder = zoo_path(target, field=None)
    else:
        folder = Path(target)
        if not (folder / "card.json").is_file():
            raise ReduceError(f"{folder} is neither a zoo model name nor a folder with a card.json; known names: {', '.join(ZOO_SPECS)}")
    corpus_seed = json.loads((folder / "card.json").read_text())["corpus_seed"]
    return evaluate_model(load_model(str(folder)), corpus_seed=corpus_seed, sample=sample)
