"""Learning-rate schedules: the values transformers' ``get_scheduler`` gives, step by step, in pure Python.

``learning_rate(step, ...)`` is the rate of the 0-based optimizer update ``step``: ``base_lr · f(step)``, where ``f``
is the schedule's multiplier (a linear warm-up ``step / warmup`` for ``step < warmup``, then the decay). It equals
what a torch optimizer driven by ``get_scheduler(name, optimizer, warmup, total, scheduler_specific_kwargs=kwargs)``
uses at its ``step + 1``-th ``optimizer.step()`` (after ``step`` calls of ``scheduler.step()``), past the total too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from peftdecl.errors import TrainConfigError
from peftdecl.train.config import TrainingConfig

KWARGS_PATH = "$.training.lr_scheduler_kwargs"

SCHEDULER_KWARGS: dict[str, dict[str, float]] = {
    "constant": {},
    "constant_with_warmup": {},
    "linear": {},
    "cosine": {"num_cycles": 0.5},
    "cosine_with_restarts": {"num_cycles": 1.0},
    "polynomial": {"power": 1.0, "lr_end": 1.0e-7},
}
"""Each scheduler's extra arguments and their transformers defaults; any other key is an error."""


def warmup_steps_for(training: TrainingConfig, total_steps: int) -> int:
    """Warm-up length: ``warmup_steps`` when it is positive, otherwise ``ceil(warmup_ratio · total_steps)``."""
    if training.warmup_steps > 0:
        return training.warmup_steps
    return math.ceil(total_steps * training.warmup_ratio)


def scheduler_arguments(scheduler: str, base_lr: float, kwargs: Mapping[str, float]) -> dict[str, float]:
    """The scheduler's extra arguments (defaults filled in), checked: unknown keys and values transformers
    refuses are :class:`TrainConfigError` naming ``$.training.lr_scheduler_kwargs.<key>``."""
    if scheduler not in SCHEDULER_KWARGS:
        known = ", ".join(SCHEDULER_KWARGS)
        raise TrainConfigError(
            [("$.training.lr_scheduler_type", f"unknown scheduler {scheduler!r}; expected one of {known}")]
        )
    defaults = SCHEDULER_KWARGS[scheduler]
    problems = []
    for key in kwargs:
        if key not in defaults:
            allowed = ", ".join(defaults) if defaults else "none"
            problems.append(
                (f"{KWARGS_PATH}.{key}", f"is not an argument of {scheduler!r} (allowed: {allowed})")
            )
    if problems:
        raise TrainConfigError(problems)
    arguments = {**defaults, **{key: float(value) for key, value in kwargs.items()}}
    if scheduler == "polynomial" and not arguments["lr_end"] < base_lr:
        raise TrainConfigError(
            [
                (
                    f"{KWARGS_PATH}.lr_end",
                    f"is {arguments['lr_end']!r}; it must be below the learning rate ({base_lr!r})",
                )
            ]
        )
    return arguments


def learning_rate(
    step: int,
    *,
    scheduler: str,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    kwargs: Mapping[str, float] | None = None,
) -> float:
    """The learning rate of 0-based optimizer update ``step``: ``base_lr · f(step)`` (see the module docstring)."""
    arguments = scheduler_arguments(scheduler, base_lr, kwargs or {})
    return base_lr * _MULTIPLIERS[scheduler](step, warmup_steps, total_steps, base_lr, arguments)


def _warming(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _decay_progress(step: int, warmup: int, total: int) -> float:
    """Fraction of the decay phase done (exceeds 1 past the total)."""
    return float(step - warmup) / float(max(1, total - warmup))


def _constant(step: int, warmup: int, total: int, base_lr: float, a: Mapping[str, float]) -> float:
    return 1.0


def _constant_with_warmup(
    step: int, warmup: int, total: int, base_lr: float, a: Mapping[str, float]
) -> float:
    return _warming(step, warmup) if step < warmup else 1.0


def _linear(step: int, warmup: int, total: int, base_lr: float, a: Mapping[str, float]) -> float:
    if step < warmup:
        return _warming(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _cosine(step: int, warmup: int, total: int, base_lr: float, a: Mapping[str, float]) -> float:
    """Half a cosine per cycle (0.5 cycles: from 1 down to 0 over the decay); it rises again past the total."""
    if step < warmup:
        return _warming(step, warmup)
    progress = _decay_progress(step, warmup, total)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * a["num_cycles"] * 2.0 * progress)))


def _cosine_with_restarts(
    step: int, warmup: int, total: int, base_lr: float, a: Mapping[str, float]
) -> float:
    """``num_cycles`` full decays from 1 to 0, each restarting at 1; 0 from the total on."""
    if step < warmup:
        return _warming(step, warmup)
    progress = _decay_progress(step, warmup, total)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((a["num_cycles"] * progress) % 1.0))))


def _polynomial(step: int, warmup: int, total: int, base_lr: float, a: Mapping[str, float]) -> float:
    """``lr = (base_lr − lr_end) · (1 − progress)^power + lr_end``, as a multiplier of ``base_lr``."""
    if step < warmup:
        return _warming(step, warmup)
    lr_end = a["lr_end"]
    # transformers divides by zero at step == total == warmup; the value there is the limit, lr_end
    if step > total or total == warmup:
        return lr_end / base_lr
    remaining = 1 - (step - warmup) / (total - warmup)
    shrunk: float = remaining ** a["power"]  # float ** float is typed Any (a negative base gives a complex)
    return ((base_lr - lr_end) * shrunk + lr_end) / base_lr


_MULTIPLIERS: dict[str, Callable[[int, int, int, float, Mapping[str, float]], float]] = {
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
}
