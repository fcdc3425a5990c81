"""LoRA initialisations that need more than the base weight (calibration data, a quantiser), and the store of
what their preprocessing computed for a base model.

HF PEFT keeps such results on the model's layers (CorDA's ``eigens``) until ``get_peft_model`` reads them;
peftdecl keeps them here, per base model object and initialisation name, until the adapter that needs them is
attached (``weight_initialised(..., model=)`` in :mod:`peftdecl.lora_init` reads them).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

_STORE: dict[int, tuple[object, dict[str, dict[str, Any]]]] = {}
"""id(base model) -> (the model, or a weak reference to it; init name -> module -> prepared data)."""


def _holder(model: object) -> object:
    """A weak reference where the model allows one (the entry then goes with the model), else the model."""
    key = id(model)
    try:
        return weakref.ref(model, lambda _ref: _STORE.pop(key, None))
    except TypeError:
        return model  # a plain mapping (the NumPy reference's state): kept alive while its entry exists


def _entry(model: object) -> dict[str, dict[str, Any]] | None:
    found = _STORE.get(id(model))
    if found is None:
        return None
    holder, data = found
    alive = holder() if isinstance(holder, weakref.ref) else holder
    return data if alive is model else None


def remember(model: object, init: str, per_module: Mapping[str, Any]) -> None:
    """Keep ``per_module`` (module name -> data) for adapters with ``init`` later attached to ``model``."""
    data = _entry(model)
    if data is None:
        data = {}
        _STORE[id(model)] = (_holder(model), data)
    data.setdefault(init, {}).update(per_module)


def recalled(model: object, init: str) -> dict[str, Any]:
    """The data ``remember`` kept for ``model`` and ``init`` (module name -> data); empty when there is none."""
    data = _entry(model)
    return dict(data.get(init, {})) if data is not None else {}


def forget(model: object, init: str, modules: list[str] | None = None) -> None:
    """Drop the kept data of ``modules`` (all when None), as PEFT drops a layer's once it has initialised it."""
    data = _entry(model)
    if data is None or init not in data:
        return
    if modules is None:
        del data[init]
    else:
        for module in modules:
            data[init].pop(module, None)
    if not any(data.values()):
        _STORE.pop(id(model), None)
