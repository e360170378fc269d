import pytest

from lightning_sparse.schedules import ConstantSchedule, CubicSchedule, LinearSchedule


def test_cubic_schedule_start_middle_end():
    schedule = CubicSchedule(final=0.9, start=10, end=110)
    assert schedule.sparsity_at(0) == 0.0
    assert schedule.sparsity_at(10) == 0.0
    assert schedule.sparsity_at(60) == pytest.approx(0.9 * (1 - 0.5**3))
    assert schedule.sparsity_at(110) == pytest.approx(0.9)
    assert schedule.sparsity_at(10_000) == pytest.approx(0.9)


def test_linear_schedule_start_middle_end():
    schedule = LinearSchedule(final=0.8, start=0, end=100)
    assert [schedule.sparsity_at(s) for s in (0, 50, 100, 200)] == pytest.approx([0.0, 0.4, 0.8, 0.8])


def test_constant_schedule():
    schedule = ConstantSchedule(final=0.5, start=3)
    assert [schedule.sparsity_at(s) for s in (0, 2, 3, 99)] == [0.0, 0.0, 0.5, 0.5]


def test_cubic_prunes_faster_early_than_linear():
    cubic, linear = CubicSchedule(0.9, 0, 100), LinearSchedule(0.9, 0, 100)
    assert all(cubic.sparsity_at(s) >= linear.sparsity_at(s) for s in range(101))


@pytest.mark.parametrize(
    "make",
    [
        lambda: CubicSchedule(final=1.0, start=0, end=10),
        lambda: LinearSchedule(final=-0.1, start=0, end=10),
        lambda: CubicSchedule(final=0.5, start=10, end=10),
        lambda: ConstantSchedule(final=0.5, start=-1),
    ],
)
def test_invalid_schedules_raise(make):
    with pytest.raises(ValueError):
        make()
