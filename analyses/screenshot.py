"""Screenshot an HTML page (a run's report.html, the paper) with headless Chromium, to check its layout.

    python -m analyses.screenshot runs/sva/report.html /tmp/report.png [--width 1200] [--height 4000]

Chromium is not a Python dependency: on Debian, ``apt-get install -y chromium``. Without it the
script says so and exits with status 0 (nothing to check), so that it can sit in a pipeline.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless, offline and without first-run chores: the page is a local self-contained file.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_browser() -> str | None:
    """The first Chromium-family browser on PATH, or None."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def screenshot(page, out, *, width: int = 1200, height: int = 4000, timeout: float = 120.0) -> Path:
    """Render ``page`` (an HTML file) at ``width`` × ``height`` CSS pixels into the PNG ``out``.

    Raises FileNotFoundError when no Chromium-family browser is installed, RuntimeError when the
    browser fails or writes nothing.
    """
    page, out = Path(page).resolve(), Path(out).resolve()
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium-family browser on PATH (looked for {', '.join(BROWSERS)}); on Debian: apt-get install -y chromium")
    if not page.is_file():
        raise FileNotFoundError(f"{page} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={width},{height}", page.as_uri()]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if finished.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{browser} exited with status {finished.returncode} and wrote no screenshot:\n{finished.stderr[-2000:]}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analyses.screenshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="the HTML file")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args(argv)
    if find_browser() is None:
        print(f"screenshot skipped: no Chromium-family browser on PATH ({', '.join(BROWSERS)}); on Debian: apt-get install -y chromium", file=sys.stderr)
        return 0
    print(screenshot(args.page, args.out, width=args.width, height=args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
