"""`python -m riskva_core.train` that also saves every adapter/checkpoint the upstream way.

Launched by the tests in place of ``-m riskva_core.train``: after RisKVA's trainable-only save
into DIR, ``transformers.Trainer.save_model`` (the full-state-dict gather it replaces) writes the
same weights into $RISKVA_UPSTREAM_SAVES/<adapter|checkpoint-N>, so a test can compare the two
files key by key (outside the run's folder: Trainer's checkpoint rotation globs it).
"""
import os
import sys
from pathlib import Path

from transformers import Trainer

from riskva_core.train import sft

_ours = sft.RiskvaTrainer.save_model


def _both(self, output_dir=None, _internal_call=False):
    _ours(self, output_dir, _internal_call)
    name = Path(output_dir).name
    twin = Path(os.environ["RISKVA_UPSTREAM_SAVES"]) / (name if name.startswith("checkpoint-") else "adapter")
    Trainer.save_model(self, str(twin), _internal_call)


sft.RiskvaTrainer.save_model = _both
if __name__ == "__main__":
    sys.exit(sft.main())
