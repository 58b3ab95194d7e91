"""``python -m riskva_core.train`` / ``accelerate launch … -m riskva_core.train``: the seed's command.

The training entry point lives in :mod:`riskva_core.train.sft`; this file keeps the
package runnable as a module so the seed-style launch commands work unchanged. Every rank
runs it, so an input error prints one line per rank and exits with the error's code.
"""
import sys

from riskva_core.errors import RiskvaError
from riskva_core.train.sft import main

if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except RiskvaError as exc:
        print(f"riskva train: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code)
