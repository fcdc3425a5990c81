"""Layer inputs for EVA, read by forward hooks (:func:`peftdecl.inits.eva_model.get_eva_state_dict`).

As in HF PEFT: the model runs in eval mode without gradients and with its adapters off; each hooked layer's first
positional input is turned into 2-D rows by ``prepare_layer_inputs_fn(layer_input, model_input, name)``, where
``model_input`` is ``prepare_model_inputs_fn(batch, spec)`` (or a copy of the batch). The language-modelling
defaults keep the positions whose attention mask is 1 and, with ``eva_config.use_label_mask``, whose label is not
``label_mask_value``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from peftdecl.errors import PeftdeclError

_LM = "language_modeling"


def prepare_model_inputs_fn_language_modeling(model_input: Any, spec: Any) -> torch.Tensor:
    """(row, position) indices of the tokens EVA reads: attention mask 1 and, with the label mask, label ≠ the
    masked value."""
    if not isinstance(model_input, Mapping):
        raise PeftdeclError("the language-modelling EVA input preparation needs each batch to be a dict")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    config = getattr(spec, "eva_config", None)
    use_label_mask = True if config is None else config.use_label_mask
    masked_value = -100 if config is None else config.label_mask_value
    if use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != masked_value)
    indices: torch.Tensor = mask.nonzero()
    return indices


def prepare_layer_inputs_fn_language_modeling(
    layer_input: Any, model_input: Any, layer_name: str
) -> torch.Tensor:
    """The layer's input at the positions ``model_input`` (indices from the model-input preparation) names."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def flatten_layer_inputs(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """Every row of the layer's input: all dimensions but the last folded into one."""
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


def _first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)) and layer_input:
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise PeftdeclError(
            f"{layer_name}: EVA cannot read an input of type {type(layer_input).__name__}; pass a "
            "prepare_layer_inputs_fn"
        )
    return layer_input


class EvaRecorder:
    """Runs one batch and returns each requested layer's prepared inputs (one array per call of the layer)."""

    def __init__(
        self,
        model: Any,
        modules: Mapping[str, nn.Module],
        spec: Any,
        forward_fn: Callable[[Any, Any], Any] | None,
        prepare_model_inputs_fn: Callable[..., Any] | str | None,
        prepare_layer_inputs_fn: Callable[..., Any] | Mapping[str, Callable[..., Any]] | str | None,
        device: torch.device | None,
    ) -> None:
        for given in (prepare_model_inputs_fn, prepare_layer_inputs_fn):
            if isinstance(given, str) and given != _LM:
                raise PeftdeclError(f"EVA input preparation {given!r}: expected a function, None or {_LM!r}")
        self.model = model
        self.modules = dict(modules)
        self.spec = spec
        self.forward_fn = forward_fn or (lambda m, batch: m(**batch))
        self.model_fn: Callable[..., Any] | None = (
            prepare_model_inputs_fn_language_modeling
            if isinstance(prepare_model_inputs_fn, str)
            else prepare_model_inputs_fn
        )
        self.layer_fns = _layer_fns(prepare_layer_inputs_fn, self.modules)
        self.device = device
        self.max_parameter_dim = 0

    def record(self, batch: Any, names: frozenset[str]) -> dict[str, list[np.ndarray]]:
        """Run ``batch`` with hooks on ``names``; {name: [its 2-D input rows, float32 → float64, per call]}."""
        if self.device is not None:
            batch = _to_device(batch, self.device)
        model_input = self.model_fn(batch, self.spec) if self.model_fn is not None else copy.deepcopy(batch)
        rows: dict[str, list[np.ndarray]] = {name: [] for name in names}

        def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
            def keep(_: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
                x = self.layer_fns[name](inputs, model_input, name)
                rows[name].append(x.detach().to("cpu", torch.float32).numpy().astype(np.float64))

            return keep

        handles = [self.modules[name].register_forward_hook(hook(name)) for name in names]
        try:
            with torch.no_grad():
                self.forward_fn(self.model, batch)
        finally:
            for handle in handles:
                handle.remove()
        return rows


def _layer_fns(
    given: Callable[..., Any] | Mapping[str, Callable[..., Any]] | str | None,
    modules: Mapping[str, nn.Module],
) -> dict[str, Callable[..., Any]]:
    def resolve(fn: Callable[..., Any] | str | None) -> Callable[..., Any]:
        if fn == _LM:
            return prepare_layer_inputs_fn_language_modeling
        return flatten_layer_inputs if fn is None else fn  # type: ignore[return-value]

    if isinstance(given, Mapping):
        unknown = sorted(set(given) - set(modules))
        if unknown:
            raise PeftdeclError(f"prepare_layer_inputs_fn names modules EVA does not initialise: {unknown}")
        return {name: resolve(given.get(name)) for name in modules}
    return dict.fromkeys(modules, resolve(given))


def _to_device(batch: Any, device: torch.device) -> Any:
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@contextlib.contextmanager
def eva_recorder(
    model: Any,
    names: tuple[str, ...],
    spec: Any,
    forward_fn: Callable[[Any, Any], Any] | None,
    prepare_model_inputs_fn: Callable[..., Any] | str | None,
    prepare_layer_inputs_fn: Callable[..., Any] | Mapping[str, Callable[..., Any]] | str | None,
) -> Iterator[EvaRecorder]:
    """An :class:`EvaRecorder` for ``model`` (an AdaptedModel, hooked on its wrappers with its adapters off, or a
    torch module, hooked on its layers) in eval mode; the mode and the adapters come back afterwards."""
    engine = getattr(model, "engine", None)
    torch_model: nn.Module = engine.model if engine is not None else model
    if engine is not None:
        modules = {name: engine.layer(name) for name in names}
        off = model.disable_adapter()
    else:
        modules = {name: torch_model.get_submodule(name) for name in names}
        off = contextlib.nullcontext()
    params = [p for p in torch_model.parameters() if p.device.type != "meta"]
    devices = {p.device for p in params}
    recorder = EvaRecorder(
        model,
        modules,
        spec,
        forward_fn,
        prepare_model_inputs_fn,
        prepare_layer_inputs_fn,
        next(iter(devices)) if len(devices) == 1 else None,
    )
    recorder.max_parameter_dim = max((max(p.shape, default=0) for p in torch_model.parameters()), default=0)
    training = torch_model.training
    torch_model.eval()
    try:
        with off:
            yield recorder
    finally:
        torch_model.train(training)
