"""`examples/causal_lm.py`, briefly: a tied-embedding transformer trained sparse with ST-3."""

from __future__ import annotations

from pathlib import Path

import pytest

from causal_lm import main


def test_the_language_model_example_trains_sparse_and_hardens_without_changing_a_logit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = main(
        ["--max-steps", "6", "--width", "16", "--heads", "2", "--layers", "1", "--context", "8", "--sparsity", "0.5",
         "--val-batches", "2", "--output", str(tmp_path)]
    )  # fmt: skip
    assert figures["hardening_change"] <= 1e-4  # the example also asserts the head is still the embedding
    assert figures["sparsity"] == pytest.approx(0.5, abs=1e-3)
    printed = capsys.readouterr().out
    assert "blocks.layers.0.self_attn.in_proj_weight" in printed and "embed" in printed  # the budget table
    assert "Sample: " in printed and "The callback" in printed
