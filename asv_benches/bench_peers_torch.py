"""peftdecl's torch layers and HF PEFT's on one graph per kind, with the plain frozen layer beside them.

One Linear 512×512 with bias, float32, 512 tokens, 2 threads; r = 16 (VeRA 256, OFT and BOFT blocks of 32);
non-zero adapter values on both sides. ``implementation``:

    frozen     the plain nn.Linear, weight frozen (the floor: what the adapter is added to)
    peftdecl   ``peftdecl.attach(...).engine.layer("m")``
    peft       HF PEFT's layer from ``get_peft_model``

``time_forward`` is y = layer(x) under no_grad; ``time_forward_backward`` is y.backward(dy) with the gradients
w.r.t. x and the adapter. The ``track_*`` ratios of :class:`TorchPeerRatios` are measured in one process per run,
all kinds and implementations interleaved, so machine drift between processes does not enter them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._peers import KINDS, min_times, require, torch_calls, torch_layer

IMPLEMENTATIONS = ("frozen", "peftdecl", "peft")
MODES = ("forward", "forward_backward")
BUILT: dict[tuple[str, str], dict[str, Callable[[], None]]] = {}
"""The calls of each (kind, implementation) built in this process."""


class TorchPeerLayer:
    """Seconds per call of one adapted Linear, per kind and implementation."""

    params = (list(KINDS), list(IMPLEMENTATIONS))
    param_names = ("kind", "implementation")
    # bounded sampling: one process per point, 7 to 25 samples within 0.5 s (a sample is one call here, and the
    # median of many resists the odd call another process delays); asv runs setup again before every sample, so
    # the layer is built once per process (BUILT) and setup warms both calls (no separate warm-up)
    rounds = 1
    repeat = (7, 25, 0.5)
    number = 0
    warmup_time = 0.0
    min_run_count = 2
    timeout = 120

    def setup(self, kind: str, implementation: str) -> None:
        key = (kind, implementation)
        if key not in BUILT:
            BUILT[key] = torch_calls(torch_layer(kind, implementation))
        self.calls = BUILT[key]
        for call in self.calls.values():
            call()

    def time_forward(self, kind: str, implementation: str) -> None:
        self.calls["forward"]()

    def time_forward_backward(self, kind: str, implementation: str) -> None:
        self.calls["forward_backward"]()


def measure_ratios() -> dict[str, Any]:
    """For every kind: seconds per call of frozen, peftdecl and PEFT in each mode, timed interleaved in this
    process; a kind that cannot be built records why (shown as a skip)."""
    try:
        require("torch")
        require("peft", "HF PEFT")
    except NotImplementedError as exc:
        return {"missing": str(exc)}
    found: dict[str, Any] = {}
    frozen = torch_calls(torch_layer("lora", "frozen"))
    for kind in KINDS:
        try:
            sides = [torch_calls(torch_layer(kind, side)) for side in ("peftdecl", "peft")]
        except NotImplementedError as exc:
            found[kind] = str(exc)
            continue
        found[kind] = {
            mode: dict(
                zip(IMPLEMENTATIONS, min_times([frozen[mode], *(s[mode] for s in sides)]), strict=True)
            )
            for mode in MODES
        }
    return found


class TorchPeerRatios:
    """Ratios per kind from one process: × the frozen layer for peftdecl and for PEFT, and peftdecl ÷ PEFT
    (below 1: peftdecl is faster). Each time is the fastest of 10 calls in 5 interleaved rounds."""

    params = (list(KINDS),)
    param_names = ("kind",)
    timeout = 120

    def setup_cache(self) -> dict[str, Any]:
        return measure_ratios()

    setup_cache.timeout = 600  # type: ignore[attr-defined]

    def setup(self, found: dict[str, Any], kind: str) -> None:
        if "missing" in found:
            raise NotImplementedError(found["missing"])
        if isinstance(found[kind], str):
            raise NotImplementedError(found[kind])
        self.times = found[kind]

    def _ratio(self, mode: str, top: str, bottom: str) -> float:
        return float(self.times[mode][top] / self.times[mode][bottom])

    def track_forward_peftdecl_x_frozen(self, found: dict[str, Any], kind: str) -> float:
        return self._ratio("forward", "peftdecl", "frozen")

    def track_forward_peft_x_frozen(self, found: dict[str, Any], kind: str) -> float:
        return self._ratio("forward", "peft", "frozen")

    def track_forward_peftdecl_over_peft(self, found: dict[str, Any], kind: str) -> float:
        return self._ratio("forward", "peftdecl", "peft")

    def track_forward_backward_peftdecl_x_frozen(self, found: dict[str, Any], kind: str) -> float:
        return self._ratio("forward_backward", "peftdecl", "frozen")

    def track_forward_backward_peft_x_frozen(self, found: dict[str, Any], kind: str) -> float:
        return self._ratio("forward_backward", "peft", "frozen")

    def track_forward_backward_peftdecl_over_peft(self, found: dict[str, Any], kind: str) -> float:
        return self._ratio("forward_backward", "peftdecl", "peft")

    for _name in list(locals()):
        if _name.startswith("track_"):
            locals()[_name].unit = "ratio"
    del _name
