"""lightning-sparse: STR and ST-3 sparse training as one Lightning callback."""

from lightning_sparse.callback import SparsityCallback
from lightning_sparse.hardening import harden
from lightning_sparse.methods import ST3, STR
from lightning_sparse.schedules import ConstantSchedule, CubicSchedule, LinearSchedule

__all__ = ["ST3", "STR", "ConstantSchedule", "CubicSchedule", "LinearSchedule", "SparsityCallback", "harden"]
__version__ = "0.1.0"
