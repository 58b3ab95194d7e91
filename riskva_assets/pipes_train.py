"""Training entry point under Dagster Pipes, launched on every rank by ``accelerate launch``.

    accelerate launch --config_file configs/deepspeed_zero2.yaml --num_processes N \\
        -m riskva_assets.pipes_train <riskva_core.train flags>

Rank 0 alone opens the Pipes connection: its log lines and metrics stream to the
Dagster run, and its final metrics become the ``lora_adapter`` materialization
(exactly one, whatever the number of ranks). Other ranks train with no reporter.
riskva_core stays free of Dagster: this module adapts train's Reporter protocol.
Outside Dagster (no Pipes environment) it behaves like ``python -m riskva_core.train``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

# Exit status of a run stopped by SIGTERM after its checkpoint: not a success for Dagster.
EXIT_STOPPED = 4


def rank() -> int:
    """Global rank from the launcher's environment (torchrun/accelerate set RANK)."""
    for var in ("RANK", "ACCELERATE_PROCESS_INDEX", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _metadata_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def adapter_version(adapter_dir: Path) -> str | None:
    """Content hash of the adapter weights + config: the materialization's data version."""
    files = sorted(p for p in adapter_dir.glob("adapter_*") if p.is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


class PipesReporter:
    """riskva_core.train.sft.Reporter → Dagster Pipes (rank 0 only)."""

    def __init__(self, pipes: Any):
        self.pipes = pipes
        self.reported = 0

    def log(self, msg: str) -> None:
        self.pipes.log.info(msg)

    def report_metrics(self, step: int, metrics: dict) -> None:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        self.pipes.log.info(f"step {step}: {shown}")

    def report_final(self, metadata: dict) -> None:
        meta = {k: _metadata_value(v) for k, v in metadata.items()}
        meta["reported_by_rank"] = rank()
        adapter = metadata.get("adapter_dir")
        version = adapter_version(Path(adapter)) if adapter else None
        self.pipes.report_asset_materialization(metadata=meta, data_version=version)
        self.reported += 1


def main(argv: list[str] | None = None) -> int:
    from riskva_core.errors import RiskvaError
    from riskva_core.train.sft import train
    from riskva_core.train.config import config_from_args

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_from_args(argv, description=__doc__)
        if rank() != 0:
            result = train(cfg, reporter=None)
            return EXIT_STOPPED if result.get("interrupted") else 0
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            reporter = PipesReporter(pipes)
            result = train(cfg, reporter=reporter)
            if result.get("interrupted"):
                # Stopped (SIGTERM) after a checkpoint: no adapter, so no materialization.
                pipes.log.warning(f"training stopped at step {result.get('step')}; checkpoint saved, "
                                  "rerun resumes with --resume_from_checkpoint auto")
                return EXIT_STOPPED
        return 0
    except RiskvaError as exc:
        print(f"riskva train: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
