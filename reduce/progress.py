"""Progress bars: tqdm on a terminal, silent otherwise or when ``REDUCE_PROGRESS=0``."""

from __future__ import annotations

import os
import sys


def progress_bar(iterable, *, total: int | None = None, desc: str | None = None, enabled: bool = True):
    from tqdm.auto import tqdm

    show = enabled and os.environ.get("REDUCE_PROGRESS", "1") != "0" and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not show, leave=False)
