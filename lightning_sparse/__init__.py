"""lightning-sparse: STR and ST-3 sparse training as one Lightning callback."""

from lightning_sparse.callback import SparsityCallback
from lightning_sparse.checkpoint import harden_state_dict, load_hardened
from lightning_sparse.hardening import harden
from lightning_sparse.methods import ST3, STR, SparsityMethod
from lightning_sparse.schedules import ConstantSchedule, CubicSchedule, LinearSchedule, Schedule
from lightning_sparse.stats import LayerStats, layer_stats
from lightning_sparse.thresholds import NonFiniteWeightsError

__all__ = [
    "ST3",
    "STR",
    "ConstantSchedule",
    "CubicSchedule",
    "LayerStats",
    "LinearSchedule",
    "NonFiniteWeightsError",
    "Schedule",
    "SparsityCallback",
    "SparsityMethod",
    "harden",
    "harden_state_dict",
    "layer_stats",
    "load_hardened",
]
__version__ = "0.2.0"
