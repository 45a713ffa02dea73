"""Pure functions for forgetting prevention: Fisher estimates, EWC and L2-SP penalties; no Trainer knowledge."""

from lightning_zenft.regularizers.fisher import (
    ESTIMATORS,
    Estimator,
    Fisher,
    causal_lm_logits,
    check_finite,
    fisher_bytes,
    fisher_diagonal,
)
from lightning_zenft.regularizers.fisher_io import load_fisher, save_fisher
from lightning_zenft.regularizers.penalties import (
    ewc_gradient,
    ewc_penalty,
    l2sp_gradient,
    l2sp_penalty,
    lowrank_penalty,
    weighted_delta_penalty,
)
from lightning_zenft.regularizers.targets import Targets, effective_weight_columns, find_targets

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "Fisher",
    "Targets",
    "causal_lm_logits",
    "check_finite",
    "effective_weight_columns",
    "ewc_gradient",
    "ewc_penalty",
    "find_targets",
    "fisher_bytes",
    "fisher_diagonal",
    "l2sp_gradient",
    "l2sp_penalty",
    "load_fisher",
    "lowrank_penalty",
    "save_fisher",
    "weighted_delta_penalty",
]
