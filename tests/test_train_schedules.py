"""Learning-rate schedules against transformers' own ``get_scheduler`` driving a torch optimizer, every step."""

from __future__ import annotations

import math
import os

import pytest

from peftdecl.errors import TrainConfigError
from peftdecl.train.config import TrainingConfig
from peftdecl.train.schedules import learning_rate, warmup_steps_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE_LR = 3.0e-4

# (scheduler, scheduler_specific_kwargs) pairs: every type, defaults and non-default arguments
CASES = [
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("linear", {}),
    ("cosine", {}),
    ("cosine", {"num_cycles": 1.5}),
    ("cosine", {"num_cycles": 0.25}),
    ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3.0}),
    ("polynomial", {}),
    ("polynomial", {"power": 2.0, "lr_end": 1.0e-5}),
    ("polynomial", {"power": 0.5}),
]
# (warmup, total): none, some, ratio-like, warm-up as long as the run, longer than it, a one-step run
LENGTHS = [(0, 20), (3, 20), (5, 37), (10, 10), (12, 9), (0, 1), (1, 1)]


def transformers_rates(
    scheduler: str, kwargs: dict[str, float], warmup: int, total: int, steps: int
) -> list[float]:
    """The lr a torch optimizer uses at each of its first ``steps`` updates under transformers' scheduler."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=BASE_LR)
    schedule = transformers.get_scheduler(
        scheduler,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total,
        scheduler_specific_kwargs=kwargs,
    )
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


# transformers divides by zero for polynomial at step == total when the warm-up fills the run: the next test
COMBINATIONS = [
    pytest.param(s, k, w, t, id=f"{s}-{k}-{w}-{t}")
    for s, k in CASES
    for w, t in LENGTHS
    if not (s == "polynomial" and w == t)
]


@pytest.mark.parametrize(("scheduler", "kwargs", "warmup", "total"), COMBINATIONS)
def test_learning_rate_equals_transformers(
    scheduler: str, kwargs: dict[str, float], warmup: int, total: int
) -> None:
    steps = total + 6  # past the total too: cosine rises again there, the others stay at their end value
    expected = transformers_rates(scheduler, kwargs, warmup, total, steps)
    ours = [
        learning_rate(
            step, scheduler=scheduler, base_lr=BASE_LR, warmup_steps=warmup, total_steps=total, kwargs=kwargs
        )
        for step in range(steps)
    ]
    # exact: the same float64 operations in the same order (Python floats on both sides)
    assert ours == expected


def test_polynomial_with_warmup_filling_the_run_ends_at_lr_end() -> None:
    """Where transformers raises ZeroDivisionError (warm-up == total, at the total), the value is the limit."""
    rates = [
        learning_rate(
            s, scheduler="polynomial", base_lr=1.0, warmup_steps=4, total_steps=4, kwargs={"lr_end": 0.1}
        )
        for s in range(6)
    ]
    # independent arithmetic: linear warm-up over 4 steps, then lr_end (1.0 · (0.1 / 1.0), exact)
    assert rates == [0.0, 0.25, 0.5, 0.75, 0.1, 0.1]


@pytest.mark.parametrize(
    ("scheduler", "key"),
    [("linear", "num_cycles"), ("constant", "power"), ("cosine", "lr_end"), ("polynomial", "num_cycles")],
)
def test_unknown_scheduler_argument_names_its_path(scheduler: str, key: str) -> None:
    with pytest.raises(TrainConfigError) as caught:
        learning_rate(0, scheduler=scheduler, base_lr=1e-3, warmup_steps=0, total_steps=10, kwargs={key: 1.0})
    assert caught.value.problems[0][0] == f"$.training.lr_scheduler_kwargs.{key}"


def test_polynomial_lr_end_above_learning_rate_is_refused() -> None:
    """transformers refuses lr_end ≥ the initial lr; so do we, naming the field."""
    with pytest.raises(TrainConfigError) as caught:
        learning_rate(
            0, scheduler="polynomial", base_lr=1e-3, warmup_steps=0, total_steps=10, kwargs={"lr_end": 1e-3}
        )
    assert caught.value.problems[0][0] == "$.training.lr_scheduler_kwargs.lr_end"


def test_unknown_scheduler_names_the_type_field() -> None:
    with pytest.raises(TrainConfigError) as caught:
        learning_rate(0, scheduler="inverse_sqrt", base_lr=1e-3, warmup_steps=0, total_steps=10)
    assert caught.value.problems[0][0] == "$.training.lr_scheduler_type"


@pytest.mark.parametrize(("warmup_steps", "warmup_ratio", "total"), [(0, 0.1, 95), (0, 0.0, 50), (0, 0.33, 7),
                                                                     (7, 0.5, 95), (3, 0.0, 2)])  # fmt: skip
def test_warmup_steps_equal_transformers(
    warmup_steps: int, warmup_ratio: float, total: int, tmp_path
) -> None:
    """transformers ≥ 5 takes a ratio as a float ``warmup_steps`` < 1, an int ≥ 1 as steps: the same rule."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    given = warmup_steps if warmup_steps > 0 else warmup_ratio
    arguments = transformers.TrainingArguments(output_dir=str(tmp_path), warmup_steps=given, report_to=[])
    expected = arguments.get_warmup_steps(total)
    training = TrainingConfig(warmup_steps=warmup_steps, warmup_ratio=warmup_ratio)
    assert warmup_steps_for(training, total) == expected


def test_warmup_ratio_one_is_the_whole_run() -> None:
    """A ratio of 1.0 (which transformers ≥ 5 would read as one step) is ceil(1.0 · total) warm-up steps."""
    assert warmup_steps_for(TrainingConfig(warmup_ratio=1.0), 13) == math.ceil(13 * 1.0) == 13
