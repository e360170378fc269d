import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded() -> None:
    # Model initialisations differ run to run otherwise; exact counts (ties at the threshold, dead
    # units whose weights stay exactly zero) must not depend on the draw.
    torch.manual_seed(0)
