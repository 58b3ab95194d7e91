"""The Dagster instance folder inside the data root.

    python -m riskva_assets.instance        # prints the DAGSTER_HOME to export

DAGSTER_HOME must be an absolute folder holding dagster.yaml; it is fixed at
$RISKVA_HOME/dagster_home so the UI, the CLI and the demo share one instance.
The repository's dagster.yaml is copied in (refreshed when it changed).
"""
from __future__ import annotations

import sys
from pathlib import Path

from riskva_core.atomic import write_bytes
from riskva_core.paths import DataRoot

from .resources import REPO_ROOT

INSTANCE_YAML = REPO_ROOT / "dagster.yaml"


def prepare_dagster_home(root: DataRoot | None = None) -> Path:
    root = root or DataRoot.from_env()
    home = root.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    data = INSTANCE_YAML.read_bytes()
    if not target.is_file() or target.read_bytes() != data:
        write_bytes(target, data)
    return home


def main() -> int:
    print(prepare_dagster_home())
    return 0


if __name__ == "__main__":
    sys.exit(main())
