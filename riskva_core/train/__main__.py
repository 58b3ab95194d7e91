"""``python -m riskva_core.train`` / ``accelerate launch … -m riskva_core.train``: the seed's command.

The training entry point lives in :mod:`riskva_core.train.sft`; this file keeps the
package runnable as a module so the seed-style launch commands work unchanged.
"""
from riskva_core.train.sft import main

if __name__ == "__main__":
    raise SystemExit(main())
