"""The MLX engine's own generator: one PRNG key, split for every random draw (dropout masks, OFT and BOFT block
drops), seeded from :attr:`peftdecl.options.EngineOptions.seed`.

The key lives in the adapted model's own tree under :data:`KEY`, a name with a leading underscore, so that it is
no parameter (``parameters()``, optimisers and saved weights never see it) but is part of ``model.state``: a step
compiled as mlx-lm's trainer compiles it, ``mx.compile(step, inputs=model.state, outputs=model.state)``, carries
the key from call to call and draws new masks each time. A compiled step that does not pass ``model.state`` reads
the key as a constant and draws the same masks on every call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from peftdecl.errors import PeftdeclError

KEY = "_peftdecl_key"
"""Where the key lives in the model's tree (``model[KEY]``)."""


class Generator:
    """A PRNG key held in ``root[KEY]``; each draw splits it, keeping one half and drawing with the other."""

    def __init__(self, root: nn.Module, seed: int) -> None:
        self._root = root
        root[KEY] = mx.random.key(seed)

    def key(self) -> mx.array:
        """A fresh key for one draw; the held key moves on."""
        held, sub = mx.random.split(self._root[KEY])
        self._root[KEY] = held
        return sub

    def uniform(self, shape: Sequence[int]) -> mx.array:
        """U[0, 1) of the given shape (float32)."""
        return mx.random.uniform(shape=tuple(shape), key=self.key())

    def permutation(self, n: int) -> list[int]:
        """A random permutation of range(n)."""
        return [int(i) for i in np.array(mx.random.permutation(n, key=self.key()))]

    def integers(self, high: int) -> int:
        """A random integer in [0, high)."""
        return int(np.array(mx.random.randint(0, high, key=self.key())))

    def get_state(self) -> dict[str, np.ndarray]:
        """``{"key": the held key as a uint32 NumPy array}``."""
        return {"key": np.array(self._root[KEY], dtype=np.uint32)}

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Hold the key of a state :meth:`get_state` returned: the same draws follow."""
        current = self._root[KEY]
        key = np.asarray(state.get("key")) if "key" in state else None
        if key is None or key.shape != tuple(current.shape) or key.dtype.kind not in "ui":
            got = "no 'key'" if key is None else f"'key' of shape {list(key.shape)} and dtype {key.dtype}"
            raise PeftdeclError(
                f"set_rng_state: the mlx engine's state is {{'key': uint32 array of shape {list(current.shape)}}}; "
                f"got {got}"
            )
        self._root[KEY] = mx.array(key.astype(np.uint32))

    def detach(self) -> None:
        """Take the key out of the model (``unload``: the model goes back to the user as it was)."""
        self._root.pop(KEY, None)
