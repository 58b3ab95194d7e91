"""Compatibility path for models registered before the per-stage layout.

A registered model is logged "from code": its MLflow artifacts hold a two-line script
that imports ``RiskvaModel``. Versions logged before the move import it from
``riskva_core.pyfunc``; this alias keeps them loadable. New versions import
:mod:`riskva_core.registry.pyfunc` directly.
"""
from riskva_core.registry.pyfunc import RiskvaModel

__all__ = ["RiskvaModel"]
