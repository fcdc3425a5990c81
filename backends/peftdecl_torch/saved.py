"""The wrapper the torch backend puts in place of a ``modules_to_save`` module: the active adapter's trainable copy
runs instead of the original (per batch row in a mixed batch), as HF PEFT's ``ModulesToSaveWrapper`` does."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from peftdecl.errors import PeftdeclError
from peftdecl_torch.context import EngineContext
from peftdecl_torch.mixed_batch import ADAPTER_NAMES


class SavedModule(nn.Module):
    """A ``modules_to_save`` module: the active adapter's full copy runs in place of the original."""

    def __init__(self, original: nn.Module, module_name: str, context: EngineContext) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.module_name = module_name
        self._context = context

    def add(self, name: str, values: Mapping[str, np.ndarray]) -> None:
        """A trainable copy of the original for adapter ``name`` (its tensors replaced by ``values`` if given)."""
        clone = copy.deepcopy(self.original)
        if values:
            own = dict(clone.state_dict())
            unexpected = sorted(set(values) - set(own))
            if unexpected:
                raise PeftdeclError(f"{self.module_name}: saved copy has unknown tensors {unexpected}")
            with torch.no_grad():
                for key, value in values.items():
                    own[key].copy_(
                        torch.from_numpy(np.ascontiguousarray(np.asarray(value))).to(own[key].dtype)
                    )
        for param in clone.parameters():
            param.requires_grad_(False)
        self.copies[name] = clone

    def remove(self, name: str) -> None:
        del self.copies[name]

    def active_module(self) -> nn.Module:
        """The copy of the first active adapter that has one, else the original."""
        book = self._context.book
        if book.enabled:
            for name in book.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> object:
        row_adapters = ADAPTER_NAMES.get()
        if row_adapters is None or not self._context.book.enabled:
            return self.active_module()(x, *args, **kwargs)
        rows = row_adapters.for_batch(x.shape[0], self.module_name)
        parts, order = [], []
        for name in dict.fromkeys(rows):
            index = [i for i, n in enumerate(rows) if n == name]
            module = self.copies[name] if name in self.copies else self.original  # noqa: SIM401 (ModuleDict has no get)
            parts.append(module(x[index], *args, **kwargs))
            order.extend(index)
        out = torch.cat(parts)
        return out[torch.argsort(torch.tensor(order, device=out.device))]
