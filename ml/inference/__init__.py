"""Serving-side ML: load a released ensemble, grade photographs, explain the grade.

Never imports ml.training (serving must not depend on training code).
"""

from ml.inference.ensemble import Ensemble, EnsemblePrediction, check_release, load_ensemble, resolve_ref

__all__ = ["Ensemble", "EnsemblePrediction", "check_release", "load_ensemble", "resolve_ref"]
