"""An ``mlx_lm.lora`` config's ``lr_schedule`` as the training file's ``learning_rate`` and ``lr_scheduler_*``.

A schedule maps only where transformers' schedule gives the same rate at every optimizer step of the run (both
evaluate it at the update count, 0 first): no ``lr_schedule`` is constant, ``cosine_decay`` is ``cosine`` (with
``num_cycles`` when its decay is longer than the run), ``linear_schedule`` is ``linear`` or a power-1
``polynomial``. Anything else (mlx-lm's warm-up, a cosine ending above 0 or shorter than the run, another
schedule) is refused naming its JSON path in the mlx-lm file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Protocol

from peftdecl._json import JsonObject, JsonValue


class OptionReader(Protocol):
    """What the schedule mapping needs from an mlx-lm config mapping run: numbers read and problems recorded,
    each named by its JSON path in the mlx-lm file."""

    def refuse(self, path: str, message: str) -> None: ...

    def number(self, path: str, value: JsonValue) -> float | None: ...


def schedule_options(
    schedule: JsonValue, learning_rate: JsonValue, total: int | None, reader: OptionReader
) -> JsonObject:
    """mlx-lm's ``lr_schedule`` (``learning_rate`` when it is None) as the training file's ``learning_rate``,
    ``lr_scheduler_type`` and ``lr_scheduler_kwargs`` over the run's ``total`` optimizer steps; ``{}`` (with the
    problems given to ``reader.refuse``) when no transformers schedule equals it at every step."""
    if schedule is None:
        rate = reader.number("$.learning_rate", learning_rate)
        return {"learning_rate": rate, "lr_scheduler_type": "constant"}
    if not isinstance(schedule, Mapping):
        reader.refuse(
            "$.lr_schedule", f"expected a mapping with name and arguments, got {show_option(schedule)}"
        )
        return {}
    for key in schedule:
        if key not in ("name", "arguments", "warmup", "warmup_init"):
            reader.refuse(f"$.lr_schedule.{key}", "not an mlx-lm lr_schedule option")
    if schedule.get("warmup") not in (0, None):
        # mlx-lm ramps up over steps 0..warmup and restarts the decay at warmup + 1; transformers' decay
        # starts at step warmup: the two differ from step warmup + 1 on
        why = "one step longer than transformers', so no training-file schedule equals it"
        reader.refuse("$.lr_schedule.warmup", f"mlx-lm's warm-up is {why}; write warmup_steps instead")
        return {}
    args = schedule.get("arguments")
    if not isinstance(args, list) or not args:
        reader.refuse("$.lr_schedule.arguments", f"expected a list of arguments, got {show_option(args)}")
        return {}
    values = [reader.number(f"$.lr_schedule.arguments[{i}]", a) for i, a in enumerate(args)]
    name = schedule.get("name")
    if None in values or total is None:
        return {}
    numbers = [float(v) for v in values if v is not None]
    if name == "cosine_decay" and len(numbers) in (2, 3):
        return _cosine(reader, *numbers, total=total)
    if name == "linear_schedule" and len(numbers) == 3:
        return _linear(reader, *numbers, total=total)
    maps = "cosine_decay [init, decay_steps] and linear_schedule [init, end, steps] map"
    message = f"{show_option(name)} with {len(values)} arguments has no transformers equivalent ({maps})"
    reader.refuse("$.lr_schedule", message)
    return {}


def _cosine(
    reader: OptionReader, init: float, decay_steps: float, end: float = 0.0, *, total: int
) -> JsonObject:
    if end != 0.0:
        reader.refuse(
            "$.lr_schedule.arguments[2]",
            "transformers' cosine decays to 0: a non-zero end has no equivalent",
        )
    elif decay_steps < total:
        why = "mlx-lm then holds the end value, transformers' cosine rises again"
        reader.refuse("$.lr_schedule.arguments[1]", f"{decay_steps:g} < the run's {total} steps: {why}")
    else:  # init (1 + cos(pi step / decay_steps)) / 2 is transformers' cosine with num_cycles total / (2 decay)
        kwargs = {} if decay_steps == total else {"num_cycles": total / (2.0 * decay_steps)}
        return {"learning_rate": init, "lr_scheduler_type": "cosine", "lr_scheduler_kwargs": kwargs}
    return {}


def _linear(reader: OptionReader, init: float, end: float, steps: float, *, total: int) -> JsonObject:
    if init == end:
        return {"learning_rate": init, "lr_scheduler_type": "constant"}
    if steps != total or end > init:
        why = f"only as a decay (end < init) over exactly the run's {total} steps (iters / grad_accumulation_steps)"
        reader.refuse("$.lr_schedule.arguments", f"linear_schedule maps {why}")
        return {}
    if end == 0.0:
        return {"learning_rate": init, "lr_scheduler_type": "linear"}
    # polynomial with power 1: lr_end + (init - lr_end) (1 - step / total), mlx-lm's line exactly
    kwargs = {"power": 1.0, "lr_end": end}
    return {"learning_rate": init, "lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": kwargs}


def show_option(value: JsonValue) -> str:
    """An mlx-lm option's value as a refusal quotes it: its JSON text (``repr`` if none), cut to 60 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
