"""The environment that gives training processes started through a real launch path the test-only
callbacks of tests/rank_site/sitecustomize.py (a pause after step N, a parameter digest)."""
from __future__ import annotations

import os
from pathlib import Path

from rank_site.sitecustomize import DIGEST_ENV, PAUSE_ENV, params_digest  # noqa: F401 (for the tests)

SITE_DIR = Path(__file__).resolve().parent / "rank_site"
REPO = SITE_DIR.parents[1]


def rank_env(pause_after_step: int | None = None, digest: bool = False) -> dict[str, str]:
    """Variables to add to a launch's environment (PYTHONPATH keeps the repository and what was there)."""
    paths = [str(SITE_DIR), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    if pause_after_step is not None:
        env[PAUSE_ENV] = str(pause_after_step)
    if digest:
        env[DIGEST_ENV] = "1"
    return env


def paused_marker(output_dir: Path, rank: int = 0) -> Path:
    """Written by a rank when it pauses: "STEP PID"."""
    return Path(output_dir) / "debug" / f"paused-rank{rank}"
