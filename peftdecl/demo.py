"""``peftdecl demo``: spec -> plan -> NumPy reference -> HF PEFT files -> reload -> parity, as a short table.

Every printed check states its tolerance and can fail; a failed check makes the command exit 1.

Runs on NumPy alone: the base model is a synthetic Llama-shaped state dict (hidden 64, 2 layers, GQA 4/2 heads).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, cast

import numpy as np

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel

DEMO_SPEC = """\
peft_type: LORA
task_type: CAUSAL_LM
r: 8
lora_alpha: 16
target_modules: [q_proj, k_proj, v_proj, o_proj]
init_lora_weights: false
"""


def llama_state_dict(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 128,
                     intermediate: int = 128, seed: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """A random state dict with LlamaForCausalLM's parameter names and shapes."""
    rng = np.random.default_rng(seed)
    kv = hidden // heads * kv_heads
    state = {"model.embed_tokens.weight": rng.normal(0, 0.02, (vocab, hidden))}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (intermediate, hidden),
            "mlp.up_proj": (intermediate, hidden), "mlp.down_proj": (hidden, intermediate),
        }  # fmt: skip
        for name, shape in shapes.items():
            state[f"{p}{name}.weight"] = rng.normal(0, 0.02, shape)
        state[f"{p}input_layernorm.weight"] = np.ones(hidden)
        state[f"{p}post_attention_layernorm.weight"] = np.ones(hidden)
    state["model.norm.weight"] = np.ones(hidden)
    state["lm_head.weight"] = rng.normal(0, 0.02, (vocab, hidden))
    return state


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖b‖ (∞ when b is zero and a is not: a change measured against nothing proves nothing)."""
    diff, ref = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


class _Facts(TypedDict):
    """The model-fact keywords ``attach`` takes for a state dict (see :class:`~peftdecl.plan.ir.ModelInfo`)."""

    layer_types: dict[str, str]
    output_head: str
    word_embeddings: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    model_class: tuple[str, str]


FACTS: _Facts = {
    "layer_types": {"model.embed_tokens": "embedding"}, "output_head": "lm_head",
    "word_embeddings": "model.embed_tokens", "model_type": "llama", "num_layers": 2, "hidden_size": 64,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
    "model_class": ("LlamaForCausalLM", "transformers.models.llama.modeling_llama"),
}  # fmt: skip
"""What the NumPy backend needs to know about the synthetic Llama (it has no config to read them from)."""
PERTURB = 0.05
"""Seeded N(0, PERTURB²) noise added to every trainable tensor, so a zero-initialised adapter (LoRA's B = 0,
DoRA, IA³'s ones, OFT's zero skew) changes the output before anything is checked against it."""
MIN_CHANGE = 1e-3
"""The adapter must change a layer's output by at least this (relative) for the later checks to mean anything."""
RELOAD_TOL = 1e-5
"""Adapter deltas after a float32 save and reload agree to float32 rounding: ‖Δ_reloaded − Δ‖ / ‖Δ‖ ≤ this."""
MERGE_TOL = 1e-10
"""float64 merged weight vs the unmerged forward, compared on the adapter's delta."""


def _input(model: AdaptedModel, module: str, seed: int) -> np.ndarray:
    """Three rows of input for ``module``: token ids for an embedding, N(0, 1) features otherwise."""
    layer = model.info.layers[module]
    rng = np.random.default_rng(seed)
    if layer.type == "embedding":
        return rng.integers(0, layer.in_features, size=(3,))
    return rng.normal(size=(3, layer.in_features))


def _delta(model: AdaptedModel, module: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the base output, the adapter's change to it) of ``module`` on ``x``."""
    adapted = model(module, x)
    with model.disable_adapters():
        base = model(module, x)
    return base, adapted - base


def _status(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def run_demo(spec_path: Path | None = None, out: Path | None = None) -> int:
    """Run every step, print the table, return 0 if every check passes and 1 otherwise.

    Checks: the (perturbed) adapter changes a layer's output by ≥ MIN_CHANGE; after saving HF PEFT files and
    reloading them every layer's adapter delta agrees within RELOAD_TOL; the merged weight applied densely
    (x W_mergedᵀ) reproduces the adapter's delta within MERGE_TOL. With ``out`` the files are kept there;
    without it they are written to a temporary folder that is deleted, and no path is printed."""
    import peftdecl
    from peftdecl.equiv import perturbed
    from peftdecl.errors import PeftdeclError

    rows: list[tuple[str, str, str]] = []
    start = time.perf_counter()
    spec = peftdecl.load_spec(spec_path if spec_path is not None else DEMO_SPEC)
    rows.append(("spec", f"{spec.peft_type} r={getattr(spec, 'r', '-')} validated", "ok"))

    state = llama_state_dict()
    model = peftdecl.attach(state, spec, seed=0, **FACTS)
    plan = model.plan()
    if not plan.layers:
        raise PeftdeclError(
            f"the demo checks adapters on layers; {spec.peft_type} adapts none (use peftdecl equiv for it)"
        )
    trainable = {k for k, p in plan.param_specs().items() if p.role == "trainable"}
    arrays = perturbed(model.state_dict(), trainable, PERTURB, seed=0)
    model.delete_adapter("default")
    model.add_adapter("default", spec, arrays=arrays, activate=True)
    model.eval()
    rows.append(("plan", f"{len(plan.layers)} layers, {plan.num_parameters('trainable'):,} trainable, "
                         f"perturbed by N(0, {PERTURB}²)", "ok"))  # fmt: skip

    linear = [lp.module for lp in plan.layers if lp.layer.type == "linear"]
    module = linear[0] if linear else plan.layers[0].module
    x = _input(model, module, seed=1)
    base, delta = _delta(model, module, x)
    change = _rel(base + delta, base)
    checks = [change >= MIN_CHANGE]
    rows.append(("forward", f"{module}: adapter changes output by {change:.2e} (need ≥ {MIN_CHANGE:g})",
                 _status(checks[-1])))  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out is not None else Path(tmp) / "adapter"
        model.save(folder)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        where = str(folder) if out is not None else "a temporary folder, deleted afterwards"
        rows.append(("save", f"HF PEFT files ({size:,} bytes) in {where}", "ok"))
        reloaded = peftdecl.load_adapter(state, folder, **FACTS)
        reloaded.eval()
        worst = 0.0
        for index, lp in enumerate(plan.layers):
            x_layer = _input(model, lp.module, seed=2 + index)
            worst = max(
                worst, _rel(_delta(reloaded, lp.module, x_layer)[1], _delta(model, lp.module, x_layer)[1])
            )
        checks.append(worst <= RELOAD_TOL)
        rows.append(("reload", f"adapter delta, max relative error over {len(plan.layers)} layers {worst:.1e} "
                               f"(tol {RELOAD_TOL:g})", _status(checks[-1])))  # fmt: skip

    layer_type = model.info.layers[module].type
    if layer_type in ("linear", "embedding"):
        # the NumPy reference's base model is its mapping of weight names to arrays
        merged = cast("Mapping[str, np.ndarray]", model.merge_and_unload())
        weight = np.asarray(merged[f"{module}.weight"], dtype=np.float64)
        # the merged weight applied on its own: a product (linear) or a row lookup (embedding)
        dense = x @ weight.T if layer_type == "linear" else weight[x]
        bias = merged.get(f"{module}.bias")
        if bias is not None:
            dense = dense + np.asarray(bias, dtype=np.float64)
        merge_err = _rel(dense - base, delta)
        checks.append(merge_err <= MERGE_TOL)
        what = "x·W_mergedᵀ" if layer_type == "linear" else "W_merged[ids]"
        rows.append(("merge", f"{what} vs the adapter's delta: {merge_err:.1e} (tol {MERGE_TOL:g}, float64)",
                     _status(checks[-1])))  # fmt: skip
    else:
        rows.append(("merge", f"{module} is a {layer_type} layer: no dense merged check", "skipped"))
    passed = all(checks)
    rows.append(("total", f"{sum(checks)}/{len(checks)} checks passed in {(time.perf_counter() - start) * 1e3:.0f} ms",
                 _status(passed)))  # fmt: skip
    _print_table(rows)
    return 0 if passed else 1


def _print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[1]) for r in rows)
    print(f"{'step':<8}  {'what':<{width}}  status")
    print(f"{'-' * 8}  {'-' * width}  ------")
    for step, what, status in rows:
        print(f"{step:<8}  {what:<{width}}  {status}")
