"""Render report pages in headless Chromium, from disk, to PNG: the check that a report shows
in a real browser (no server, no network, no JavaScript needed)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from conformance.report.writer import page_name

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# The flags Debian's Chromium needs to start headless as root on a machine without network.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")


class ScreenshotError(RuntimeError):
    """No browser, no such page, or the browser wrote no picture."""


def find_browser(explicit: str | None = None) -> str:
    for name in ([explicit] if explicit else BROWSERS):
        path = shutil.which(name)
        if path:
            return path
    raise ScreenshotError(f"no browser found (looked for {explicit or ', '.join(BROWSERS)}); "
                          "on Debian: apt-get install chromium")


def shoot(report: Path, output: Path, cases: list[str], browser: str | None = None,
          size: tuple[int, int] = (1400, 2400)) -> list[Path]:
    """One PNG of the overview and one per named case; returns their paths."""
    executable = find_browser(browser)
    pages = [("index", report / "index.html")] + [(case, report / page_name(case)) for case in cases]
    output.mkdir(parents=True, exist_ok=True)
    shots = []
    for name, page in pages:
        if not page.is_file():
            raise ScreenshotError(f"{page}: no such page (is {report} a report folder, and {name!r} a case in it?)")
        target = output / (Path(page_name(name)).stem + ".png")
        target.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([executable, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                            f"--screenshot={target.resolve()}", page.resolve().as_uri()],
                           capture_output=True, timeout=120, check=False)
        if not target.is_file() or target.stat().st_size == 0:
            raise ScreenshotError(f"{executable} wrote no screenshot of {page}")
        shots.append(target)
    return shots
