"""Supervised fine-tuning on transformers.Trainer (entry point: sft.py; ``-m riskva_core.train``)."""
import importlib.util
import os
import sys


def _unshadow_datasets() -> None:
    """Drop the working directory from ``sys.path`` when its ``datasets/`` folder shadows nothing real.

    ``python -m`` (and so ``accelerate launch -m``) puts the working directory first on sys.path.
    The seed's layout keeps data in ./datasets/, which Python then imports as a namespace package
    named ``datasets``; transformers only checks ``find_spec("datasets")`` and, believing the
    Hugging Face library is installed, fails inside Trainer (``datasets.Dataset`` missing). Our
    own modules are already imported through the package's ``__path__``, so nothing else changes.
    """
    spec = importlib.util.find_spec("datasets")
    if spec is not None and spec.origin in (None, "namespace") and "transformers.trainer" not in sys.modules:
        cwd = os.getcwd()
        sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]


_unshadow_datasets()
