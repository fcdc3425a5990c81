"""A NumPy generator's state as arrays, and back: what ``Engine.get_rng_state`` / ``set_rng_state`` exchange.

The default generator (PCG64) has a 128-bit state and increment; each is stored as two uint64 words (high, low),
with the buffered 32-bit draw (``has_uint32``, ``uinteger``) beside them, so a training checkpoint can keep the
state in safetensors.
"""

from __future__ import annotations

import numpy as np

from peftdecl.errors import PeftdeclError

_MASK = (1 << 64) - 1
KEYS = ("pcg64_state", "pcg64_inc", "has_uint32", "uinteger")


def _words(value: int) -> np.ndarray:
    return np.array([(value >> 64) & _MASK, value & _MASK], dtype=np.uint64)


def _number(words: np.ndarray) -> int:
    high, low = (int(w) for w in np.asarray(words, dtype=np.uint64).reshape(2))
    return (high << 64) | low


def generator_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The state of ``rng`` (a PCG64 generator) as NumPy arrays."""
    state = rng.bit_generator.state
    if state.get("bit_generator") != "PCG64":
        raise PeftdeclError(
            f"cannot save the state of a {state.get('bit_generator')} generator; expected PCG64"
        )
    return {
        "pcg64_state": _words(state["state"]["state"]),
        "pcg64_inc": _words(state["state"]["inc"]),
        "has_uint32": np.array([state["has_uint32"]], dtype=np.uint64),
        "uinteger": np.array([state["uinteger"]], dtype=np.uint64),
    }


def restore_generator(rng: np.random.Generator, state: dict[str, np.ndarray]) -> None:
    """Put ``rng`` back into a state of :func:`generator_state` (the same draws follow)."""
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise PeftdeclError(f"rng state lacks {missing}; expected the arrays {list(KEYS)}")
    try:
        rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": _number(state["pcg64_state"]), "inc": _number(state["pcg64_inc"])},
            "has_uint32": int(np.asarray(state["has_uint32"]).reshape(-1)[0]),
            "uinteger": int(np.asarray(state["uinteger"]).reshape(-1)[0]),
        }
    except (ValueError, TypeError) as exc:
        raise PeftdeclError(f"rng state does not fit the engine's PCG64 generator: {exc}") from None
