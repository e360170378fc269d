"""Command-line arguments shared by the examples: which sparsity method, with what settings."""

from __future__ import annotations

import argparse

from lightning_sparse import SparsityCallback


def add_sparsity_args(parser: argparse.ArgumentParser, s_init: float, threshold_decay: float) -> None:
    """Add `--method`, `--sparsity`, `--s-init` and `--threshold-decay`, with STR defaults for this example."""
    parser.add_argument(
        "--method",
        choices=["st3", "st3sigma", "str", "dense"],
        default="st3",
        help="st3 / st3sigma: ST-3, one global magnitude threshold that follows a schedule to --sparsity; "
        "str: STR, learned per-layer thresholds; dense: no sparsity, a baseline",
    )
    parser.add_argument(
        "--sparsity", type=float, default=0.9, help="ST-3's target: fraction of conv/linear weights that end at 0"
    )
    parser.add_argument(
        "--s-init", type=float, default=s_init, help="STR's initial threshold parameter s (threshold: sigmoid(s))"
    )
    parser.add_argument(
        "--threshold-decay",
        type=float,
        default=threshold_decay,
        help="STR's weight decay on its threshold parameters: larger ends sparser",
    )


def make_callback(args: argparse.Namespace, **st3: float) -> list[SparsityCallback]:
    """The callbacks list for `--method`: empty for a dense baseline. `st3`: ST-3's `start`, `end`, `freeze_at`."""
    if args.method == "dense":
        return []
    if args.method == "str":
        return [SparsityCallback("str", s_init=args.s_init, threshold_decay=args.threshold_decay)]
    return [SparsityCallback(args.method, target_sparsity=args.sparsity, **st3)]
