"""peftdecl's MLX LoRA and DoRA layers and mlx-lm's LoRALinear / DoRALinear on one graph, with the plain nn.Linear.

Linear 128×128 with bias, float32, 128 tokens, r = 16, scale 2, dropout 0 (mlx[cpu] on Linux multiplies with a
slow reference BLAS, so the shapes are tiny). Every timed call ends in ``mx.eval`` (MLX is lazy).
``time_forward`` runs in eval mode (peftdecl's DoRA reuses its weight norm, as at inference); ``time_forward_backward``
is the value and gradients of Σ layer(x) ⊙ dy w.r.t. x and the adapter arrays, in training mode (the frozen layer:
w.r.t. x only). mlx-lm's B starts at zero; both sides get non-zero B here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._peers import SMOKE, min_times, require, unsupported

DIM = 32 if SMOKE else 128
TOKENS = 32 if SMOKE else 128
RANK = 8 if SMOKE else 16
SCALE = 2.0
KINDS = ("lora", "dora")
IMPLEMENTATIONS = ("frozen", "peftdecl", "mlx_lm")
MODES = ("forward", "forward_backward")
BUILT: dict[tuple[str, str], dict[str, Callable[[], None]]] = {}
"""The calls of each (kind, implementation) built in this process."""


def mlx_layer(kind: str, implementation: str) -> Any:
    """The layer of ``implementation`` on a Linear DIM×DIM (seed 0), adapter B non-zero."""
    mx = require("mlx.core", "mlx")
    nn = require("mlx.nn", "mlx")
    mx.random.seed(0)
    base = nn.Linear(DIM, DIM)
    if implementation == "frozen":
        base.freeze()
        return base
    if implementation == "mlx_lm":
        tuner = require("mlx_lm.tuner.dora" if kind == "dora" else "mlx_lm.tuner.lora", "mlx-lm")
        cls = tuner.DoRALinear if kind == "dora" else tuner.LoRALinear
        theirs = cls.from_base(base, r=RANK, dropout=0.0, scale=SCALE)
        theirs.lora_b = 0.01 * mx.random.normal(theirs.lora_b.shape, key=mx.random.key(1))
        mx.eval(theirs.parameters())
        return theirs
    import peftdecl

    class Holder(nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.m = base

        def __call__(self, x: Any) -> Any:
            return self.m(x)

    spec = {"peft_type": "LORA", "r": RANK, "lora_alpha": SCALE * RANK, "use_dora": kind == "dora",
            "lora_dropout": 0.0, "target_modules": ["m"], "init_lora_weights": False}  # fmt: skip
    try:
        ours = peftdecl.attach(Holder(), spec, seed=0).engine.layer("m")
    except NotImplementedError:
        raise
    except Exception as exc:
        raise unsupported(f"peftdecl's MLX {kind}", exc) from exc
    mx.eval(ours.parameters())
    return ours


def mlx_calls(kind: str, implementation: str) -> dict[str, Callable[[], None]]:
    """``forward`` (eval mode) and ``forward_backward`` (training mode) of a fresh layer each."""
    mx = require("mlx.core", "mlx")
    import numpy as np
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((TOKENS, DIM)), mx.float32)
    dy = mx.array(rng.standard_normal((TOKENS, DIM)), mx.float32)
    inference = mlx_layer(kind, implementation).eval()
    trained = mlx_layer(kind, implementation).train()
    params = trained.trainable_parameters()
    if tree_flatten(params):

        def loss(p: Any, inputs: Any) -> Any:
            trained.update(p)
            return mx.sum(trained(inputs) * dy)

        grad = mx.value_and_grad(loss, argnums=(0, 1))
        step: Callable[[], Any] = lambda: grad(params, x)  # noqa: E731
    else:
        plain = mx.value_and_grad(lambda inputs: mx.sum(trained(inputs) * dy))
        step = lambda: plain(x)  # noqa: E731
    return {"forward": lambda: mx.eval(inference(x)), "forward_backward": lambda: mx.eval(step())}


class MlxPeerLayer:
    """Seconds per call, per kind (LoRA, DoRA) and implementation."""

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
            BUILT[key] = mlx_calls(kind, implementation)
        self.calls = BUILT[key]
        for call in self.calls.values():
            call()

    def time_forward(self, kind: str, implementation: str) -> None:
        self.calls["forward"]()

    def time_forward_backward(self, kind: str, implementation: str) -> None:
        self.calls["forward_backward"]()


def measure_ratios() -> dict[str, Any]:
    """Seconds per call of the three layers per kind and mode, interleaved in this process."""
    try:
        require("mlx.core", "mlx")
        require("mlx_lm", "mlx-lm")
    except NotImplementedError as exc:
        return {"missing": str(exc)}
    found: dict[str, Any] = {}
    for kind in KINDS:
        try:
            sides = [mlx_calls(kind, side) for side in IMPLEMENTATIONS]
        except NotImplementedError as exc:
            found[kind] = str(exc)
            continue
        found[kind] = {
            mode: dict(zip(IMPLEMENTATIONS, min_times([s[mode] for s in sides]), strict=True))
            for mode in MODES
        }
    return found


class MlxPeerRatios:
    """Per kind, from one process: × nn.Linear for peftdecl and mlx-lm, and peftdecl ÷ mlx-lm."""

    params = (list(KINDS),)
    param_names = ("kind",)
    timeout = 120

    def setup_cache(self) -> dict[str, Any]:
        return measure_ratios()

    setup_cache.timeout = 300  # type: ignore[attr-defined]

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

    def track_forward_mlx_lm_x_frozen(self, found: dict[str, Any], kind: str) -> float:
        return self._ratio("forward", "mlx_lm", "frozen")

    def track_forward_peftdecl_over_mlx_lm(self, found: dict[str, Any], kind: str) -> float:
        return self._ratio("forward", "peftdecl", "mlx_lm")

    def track_forward_backward_peftdecl_x_frozen(self, found: dict[str, Any], kind: str) -> float:
        return self._ratio("forward_backward", "peftdecl", "frozen")

    def track_forward_backward_mlx_lm_x_frozen(self, found: dict[str, Any], kind: str) -> float:
        return self._ratio("forward_backward", "mlx_lm", "frozen")

    def track_forward_backward_peftdecl_over_mlx_lm(self, found: dict[str, Any], kind: str) -> float:
        return self._ratio("forward_backward", "peftdecl", "mlx_lm")

    for _name in list(locals()):
        if _name.startswith("track_"):
            locals()[_name].unit = "ratio"
    del _name
