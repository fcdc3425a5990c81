"""The NumPy reference is namespace-generic: every kind, on every layer type and spec variant the reference tests,
gives the same numbers under ``array_api_strict`` (a namespace with nothing beyond the array API standard, which
also exercises the generic einsum, scatter-add and Kronecker paths of ``peftdecl_numpy.xp_ops``) and under torch's
namespace (through array_api_compat, on the CPU: another library's own einsum, kron and linear algebra) as under
NumPy.

Each case runs a training-mode forward and backward (dropout drawn from the engine's generator), an eval forward,
a merge and an unmerge, in float64. The NumPy run is the expected value; the tolerance is 1e-12 relative per array
(both runs are the same math in float64; only the order of a few sums differs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.plan.kinds.dora import MAGNITUDE
from peftdecl_numpy.kinds import prompt as prompt_math
from peftdecl_numpy.kinds.adalora import orthogonal_regularizer
from peftdecl_numpy.xp_ops import namespace, to_numpy
from tests.conftest import rel_err
from tests.layer_cases import ADALORA_MASK, BOFT_VARIANTS, KINDS, LINEAR_8_IN, LOKR_VARIANTS, OFT_VARIANTS

TOL = 1e-12
# the spec variants each kind runs with (every layer type of its table in tests/layer_cases.py)
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "lora": {"": {}, "bias": {"lora_bias": True}},
    "dora": {"": {}},
    "adalora": {"": {}, "mask": ADALORA_MASK},
    "vera": {"": {}},
    "loha": {"": {}, "effective": {"use_effective_conv2d": True}},
    "lokr": LOKR_VARIANTS,
    "ia3": {"output": {"feedforward_modules": []}, "input": {"feedforward_modules": ["m"]}},
    "oft": OFT_VARIANTS,
    "boft": BOFT_VARIANTS,
}
NO_BIAS = ("embedding", "conv2d_1x1")  # HF PEFT has no lora_bias there
# training-mode randomness per kind (OFT's module_dropout and BOFT's dropout are variants of their own)
DROPOUT = {
    "lora": {"lora_dropout": 0.3},
    "dora": {"lora_dropout": 0.3},
    "adalora": {"lora_dropout": 0.3},
    "vera": {"vera_dropout": 0.3},
    "loha": {"rank_dropout": 0.3},
    "lokr": {"rank_dropout": 0.3},
}


def cases() -> list:
    params = []
    for kind, variants in VARIANTS.items():
        for layer in sorted(KINDS[kind].layers):
            for name, fields in variants.items():
                if name == "bias" and layer in NO_BIAS:
                    continue
                params.append(
                    pytest.param(kind, layer, fields, id="-".join(filter(None, [kind, layer, name])))
                )
    return params


def build(kind: str, layer: str, fields: dict[str, Any], xp: Any) -> tuple[peftdecl.AdaptedModel, np.ndarray]:
    """``kind`` on ``layer`` (tests/layer_cases.py's base tensors and spec) in namespace ``xp`` (None: NumPy)."""
    entry, case = KINDS[kind], KINDS[kind].layers[layer]
    rng = np.random.default_rng(0)
    dropout = {} if layer == "embedding" else DROPOUT.get(kind, {})
    spec = {**entry.spec, **(entry.layer_fields or {}).get(layer, {}), **dropout, **fields}
    options = {} if xp is None else {"xp": xp}
    model = peftdecl.attach(case.random_state(rng), spec, layer_types=case.layer_types(), seed=0, **options)
    if kind == "dora":  # move m off ‖W + sBA‖ so that g ≠ 1, the same numbers in both namespaces
        magnitude = model.trainable_parameters()[f"m.{MAGNITUDE}"]
        scaled = to_numpy(magnitude) * rng.uniform(0.5, 1.5, size=magnitude.shape)
        magnitude[...] = namespace(magnitude).asarray(scaled)
    return model, case.random_input(rng)


def attach_linear(
    spec: dict[str, Any], options: dict[str, Any], **kwargs: Any
) -> tuple[peftdecl.AdaptedModel, np.random.Generator]:
    """``spec`` on tests/layer_cases.py's 8-input linear module ``m``, its tensors drawn from a generator seeded
    0; returns the model and that generator (for the input)."""
    rng = np.random.default_rng(0)
    return peftdecl.attach(LINEAR_8_IN.random_state(rng), spec, seed=0, **kwargs, **options), rng


def run(model: peftdecl.AdaptedModel, x: np.ndarray) -> dict[str, Any]:
    """Training forward and backward, eval forward, merged weight and output, unmerged weight."""
    engine = model.engine
    model.train()
    y, tape = engine.layer_forward("m", x)
    dy = np.random.default_rng(1).normal(size=tuple(y.shape))
    out = {f"grad {k}": v for k, v in engine.layer_backward("m", tape, dy).items() if v is not None}
    out["train output"] = y
    model.eval()
    out["eval output"] = model("m", x)
    model.merge()
    out["merged weight"], out["merged output"] = model.base_weight("m"), model("m", x)
    model.unmerge()
    out["unmerged weight"] = model.base_weight("m")
    return out


@pytest.fixture(params=["array_api_strict", "torch"])
def other(request: pytest.FixtureRequest) -> Any:
    """The namespace compared with NumPy (skipped where it is not installed)."""
    return pytest.importorskip(request.param)


def assert_same(strict: dict[str, Any], reference: dict[str, Any]) -> None:
    assert strict.keys() == reference.keys()
    for key, expected in reference.items():
        assert rel_err(to_numpy(strict[key]), to_numpy(expected)) <= TOL, key


def belongs(array: Any, module: Any) -> bool:
    """Whether ``array`` is an array of ``module``'s library (not silently NumPy)."""
    return type(array).__module__.split(".")[0] == module.__name__.split(".")[0]


@pytest.mark.parametrize(("kind", "layer", "fields"), cases())
def test_every_kind_runs_the_same_on_another_namespace(
    kind: str, layer: str, fields: dict[str, Any], other: Any
) -> None:
    reference = run(*build(kind, layer, fields, None))
    result = run(*build(kind, layer, fields, other))
    assert belongs(result["train output"], other) and belongs(result["eval output"], other)
    assert isinstance(reference["train output"], np.ndarray)
    assert_same(result, reference)


@pytest.mark.parametrize("active", [("lora", "dora", "ia3"), ("oft", "boft", "lora", "ia3_ff")])
def test_several_active_adapters_compose_the_same_on_another_namespace(
    active: tuple[str, ...], other: Any
) -> None:
    specs = {
        "lora": {**KINDS["lora"].spec, "lora_dropout": 0.3},
        "dora": {**KINDS["dora"].spec, "init_lora_weights": False},
        "ia3": {**KINDS["ia3"].spec, "feedforward_modules": []},
        "ia3_ff": {**KINDS["ia3"].spec, "feedforward_modules": ["m"]},
        "oft": {**KINDS["oft"].spec, "oft_block_size": 4},
        "boft": {**KINDS["boft"].spec, **BOFT_VARIANTS["dropout"]},
    }
    runs = []
    for options in ({}, {"xp": other}):  # NumPy, then the other namespace
        model, rng = attach_linear(specs[active[0]], options, name=active[0])
        for name in active[1:]:
            model.add_adapter(name, specs[name])
        model.set_adapter(list(active))
        runs.append(run(model, LINEAR_8_IN.random_input(rng)))
    assert belongs(runs[1]["train output"], other)
    assert_same(runs[1], runs[0])


def test_a_mixed_batch_runs_the_same_on_another_namespace(other: Any) -> None:
    outputs = []
    for options in ({}, {"xp": other}):  # NumPy, then the other namespace
        model, rng = attach_linear(KINDS["lora"].spec, options)
        model.add_adapter("b", {**KINDS["vera"].spec, "target_modules": ["m"]})
        x = rng.normal(size=(4, 8))
        outputs.append(model("m", x, adapter_names=["b", "default", "__base__", "b"]))
    assert belongs(outputs[1], other)
    assert rel_err(to_numpy(outputs[1]), outputs[0]) <= TOL


@pytest.mark.parametrize("projection", [False, True])
def test_prompt_tables_and_their_gradients_are_the_same_on_another_namespace(
    projection: bool, other: Any
) -> None:
    spec = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": 3,
        "prefix_projection": projection,
        "encoder_hidden_size": 5,
    }
    facts = {"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "word_embeddings": "embed"}
    state = {"embed.weight": np.random.default_rng(0).normal(size=(11, 8))}
    runs = []
    for options in ({}, {"xp": other}):  # NumPy, then the other namespace
        model = peftdecl.attach(state, spec, layer_types={"embed": "embedding"}, seed=0, **facts, **options)
        table = model.engine.prompt_table()
        kv = model.engine.prefix_key_values(batch_size=2)
        d_table = np.random.default_rng(2).normal(size=tuple(table.shape))
        grads = model.engine.prompt_backward(d_table)
        d_kv = prompt_math.key_values_backward(model.plan().prompt, kv)
        runs.append({"table": table, "kv": kv[1][0], "d_kv": d_kv, **grads})
    assert belongs(runs[1]["table"], other)
    assert_same(runs[1], runs[0])


def test_the_orthogonal_regularizer_is_the_same_on_another_namespace(other: Any) -> None:
    terms = []
    for options in ({}, {"xp": other}):  # NumPy, then the other namespace
        model, _ = attach_linear({**KINDS["adalora"].spec, **ADALORA_MASK}, options)
        terms.append(orthogonal_regularizer(model.plan(), model.trainable_parameters()))
    (value_np, grads_np), (value_strict, grads_strict) = terms
    assert abs(value_strict - value_np) <= TOL * abs(value_np)
    assert all(belongs(g, other) for g in grads_strict.values())
    assert_same(grads_strict, grads_np)
