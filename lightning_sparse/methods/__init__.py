"""Sparsity methods: small `torch.nn.utils.parametrize` modules plus their per-step updates."""

from lightning_sparse.methods.st3 import ST3, update_st3
from lightning_sparse.methods.str import STR

__all__ = ["ST3", "STR", "update_st3"]
