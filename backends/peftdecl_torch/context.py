"""What every wrapper of one torch engine reads: the model's adapter book, the engine's options and its generators.

Random draws of the adapters (dropout masks, rank dropout, OFT/BOFT block dropout, LoHa/LoKr module dropout) come
from the engine's own ``torch.Generator`` (one per device, each seeded from ``EngineOptions.seed``), never from
torch's global generator, so that a training run can save and restore them with the engine's RNG state.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from peftdecl.adapter_book import AdapterBook
from peftdecl.errors import BackendError
from peftdecl.options import EngineOptions


class Generators:
    """One ``torch.Generator`` per device, created on first use and seeded from ``seed``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._by_device: dict[str, torch.Generator] = {}
        self.on(torch.device("cpu"))

    def on(self, device: torch.device) -> torch.Generator:
        """The generator of ``device`` (a CUDA tensor's draws must come from a generator on its device)."""
        key = _key(device)
        found = self._by_device.get(key)
        if found is None:
            found = torch.Generator(device=key).manual_seed(self.seed)
            self._by_device[key] = found
        return found

    def get_state(self) -> dict[str, np.ndarray]:
        """Device -> the generator's state as a uint8 array."""
        return {key: gen.get_state().numpy().copy() for key, gen in self._by_device.items()}

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the states :meth:`get_state` returned (a device not used yet gets its generator now)."""
        for key, value in state.items():
            try:
                device = torch.device(key)
            except RuntimeError as exc:
                raise BackendError(f"RNG state names an unknown device {key!r}") from exc
            array = np.ascontiguousarray(np.asarray(value, dtype=np.uint8))
            self.on(device).set_state(torch.from_numpy(array.copy()))


def _key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


class EngineContext:
    """Shared by the engine and its wrappers: read-only views of the book and options, plus the generators."""

    def __init__(self, book: AdapterBook, options: EngineOptions) -> None:
        self.book = book
        self.options = options
        self.generators = Generators(options.seed)
