"""``peftdecl demo``: spec -> plan -> NumPy reference -> HF PEFT files -> reload -> parity, as a short table.

Runs on NumPy alone: the base model is a synthetic Llama-shaped state dict (hidden 64, 2 layers, GQA 4/2 heads).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

DEMO_SPEC = """\
peft_type: LORA
task_type: CAUSAL_LM
r: 8
lora_alpha: 16
target_modules: [q_proj, k_proj, v_proj, o_proj]
init_lora_weights: false
"""
PARITY_TOL = 1e-6  # files are float32; outputs after reload agree to float32 rounding


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
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def run_demo(spec_path: Path | None = None, out: Path | None = None) -> int:
    """Run every step, print the table, return 0 if all parity checks pass."""
    import peftdecl

    rows: list[tuple[str, str, str]] = []
    source = spec_path if spec_path is not None else DEMO_SPEC
    start = time.perf_counter()
    spec = peftdecl.load_spec(source)
    rows.append(("spec", f"{spec.peft_type} r={getattr(spec, 'r', '-')} validated", "ok"))

    state = llama_state_dict()
    facts = {
        "layer_types": {"model.embed_tokens": "embedding"}, "output_head": "lm_head",
        "word_embeddings": "model.embed_tokens", "model_type": "llama", "num_layers": 2, "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
        "model_class": ("LlamaForCausalLM", "transformers.models.llama.modeling_llama"),
    }  # fmt: skip
    model = peftdecl.attach(state, spec, seed=0, **facts)
    plan = model.plan()
    rows.append(("plan", f"{len(plan.layers)} layers, {plan.num_parameters('trainable'):,} trainable", "ok"))

    module = plan.layers[0].module
    x = np.random.default_rng(1).normal(size=(4, model.info.layers[module].in_features))
    adapted = model(module, x)
    with model.disable_adapters():
        base = model(module, x)
    rows.append(("forward", f"{module}: adapter changes output by {_rel(adapted, base):.2e}", "ok"))

    checks_ok = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out is not None else Path(tmp) / "adapter"
        model.save(folder)
        size = sum(p.stat().st_size for p in folder.iterdir())
        rows.append(("save", f"HF PEFT files in {folder.name}/ ({size:,} bytes)", "ok"))
        reloaded = peftdecl.load_adapter(state, folder, **facts)
        worst = max(_rel(reloaded(lp.module, _input(model, lp.module)), model(lp.module, _input(model, lp.module)))
                    for lp in plan.layers)  # fmt: skip
        ok = worst <= PARITY_TOL
        checks_ok &= ok
        rows.append(("reload", f"max relative error over {len(plan.layers)} layers {worst:.1e} (tol {PARITY_TOL:g})",
                     "ok" if ok else "FAIL"))  # fmt: skip
    merged = model.merge_and_unload()
    w = merged[f"{module}.weight"]
    model.unmerge()
    merge_err = _rel(x @ w.T, adapted)
    ok = merge_err <= 1e-12
    checks_ok &= ok
    rows.append(
        (
            "merge",
            f"x·W_mergedᵀ vs adapter forward: {merge_err:.1e} (tol 1e-12, float64)",
            "ok" if ok else "FAIL",
        )
    )
    rows.append(("total", f"{(time.perf_counter() - start) * 1e3:.0f} ms", "ok" if checks_ok else "FAIL"))
    _print_table(rows)
    return 0 if checks_ok else 1


def _input(model: object, module: str) -> np.ndarray:
    return np.random.default_rng(2).normal(size=(3, model.info.layers[module].in_features))  # type: ignore[attr-defined]


def _print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[1]) for r in rows)
    print(f"{'step':<8}  {'what':<{width}}  status")
    print(f"{'-' * 8}  {'-' * width}  ------")
    for step, what, status in rows:
        print(f"{step:<8}  {what:<{width}}  {status}")
