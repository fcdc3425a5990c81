"""Every adapter kind, on every layer type it declares, on every backend (the ``backend`` fixture, narrowed by
PEFTDECL_TEST_BACKENDS), against the float64 NumPy reference on the same numbers.

The table is derived from the kind registry (``peftdecl.kinds.kinds()``: each kind's layer types and example
spec), on the layer shapes of tests/layer_cases.py, plus the spec variants below. Per row and backend:

- output and the gradients of every trainable tensor and of the input equal the reference's explicit backward
  (relative error ≤ 1e-5 in float32, ≤ 1e-10 in float64); on the NumPy backend itself the gradients are checked
  against central finite differences instead (tests/gradcheck.py, ≤ 1e-6);
- merge gives the reference's merged weight (≤ 1e-6 float32, ≤ 1e-10 float64), the merged forward equals the
  adapter forward, and unmerge restores the base weight;
- save (HF layout) and load_adapter on a fresh base give the same output.
Then what the rows do not reach: training mode with dropout (the backend's draws replayed from the reference's
generator, where the backend lets a test do that), two COFT training steps, random LoRA/DoRA linear shapes
(hypothesis), and backend paths the tiny layers would not take (forced).
A case the backend's Capabilities lacks is skipped with its ``why_not`` reason.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peftdecl
from peftdecl.equiv import perturbed
from peftdecl.kinds import kinds
from peftdecl.plan.kinds import registry as layouts
from tests import layer_cases
from tests.backend_models import Driver, driver, float32_input, float32_state, layer_type, modules
from tests.conftest import rel_err
from tests.gradcheck import check_gradients
from tests.layer_cases import Layer

TOL = {"float32": 1e-5, "float64": 1e-10}  # outputs and gradients vs the float64 reference, relative
MERGE_TOL = {"float32": 1e-6, "float64": 1e-10}  # merged / unmerged weights, relative
CHANGED = 1e-3  # an adapter output at least this far (relative) from the base output really changes it
SEED = 3


class Case(NamedTuple):
    kind: str
    layer: str  # the layer's name in the kind's table of tests/layer_cases.py
    spec: dict[str, Any]
    shapes: Layer
    variant: str = ""

    @property
    def id(self) -> str:
        return f"{self.variant or self.kind}-{self.layer}"


# variant (tests/layer_cases.py's SPEC_VARIANTS) -> the layers of its kind it runs on
VARIANTS: dict[str, tuple[str, ...]] = {
    "lora_rslora": ("linear", "conv2d"),
    "lora_bias": ("linear", "conv1d", "conv2d", "gpt2_conv1d"),
    "adalora_masked": ("linear",),
    "ia3_feedforward": ("linear", "conv2d", "gpt2_conv1d"),
    "loha_effective": ("conv2d",),
    "lokr_full": ("linear", "conv1d", "conv2d", "conv2d_1x1"),
    "lokr_decomposed": ("linear", "conv2d"),
    "lokr_effective": ("conv1d", "conv2d"),
    "oft_exact_cayley": ("linear", "conv2d"),
    "oft_block_share_coft": ("linear",),
    "boft_butterfly": ("linear", "conv2d_1x1"),
}


def kind_layers(kind: str) -> dict[str, Layer]:
    """The layer shapes a kind is tested on: its own table, or LoRA's for a kind tests/layer_cases.py lacks."""
    entry = layer_cases.KINDS.get(kind)
    return entry.layers if entry else layer_cases.LORA_LAYERS


def spec_for(kind: str, layer: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """The registry's example for the layer's type, the fields that depend on the layer's shape, ``fields``."""
    shapes = kind_layers(kind)[layer]
    entry = layer_cases.KINDS.get(kind)
    per_layer = (entry.layer_fields or {}).get(layer, {}) if entry else {}
    example = kinds()[kind].examples[layer_type(shapes)]
    return {**example, **per_layer, **(fields or {}), "target_modules": modules(shapes)}


def table() -> list[Case]:
    rows = []
    for name, decl in kinds().items():
        for layer, shapes in kind_layers(name).items():  # model-level kinds have no layer types: none here
            if layer_type(shapes) in decl.layer_types and layer_type(shapes) in decl.examples:
                rows.append(Case(name, layer, spec_for(name, layer), shapes))
    for variant, layers in VARIANTS.items():
        kind, fields = layer_cases.SPEC_VARIANTS[variant]
        rows += [
            Case(kind, lay, spec_for(kind, lay, fields), kind_layers(kind)[lay], variant) for lay in layers
        ]
    return rows


CASES = table()
PARAMS = [pytest.param(case, id=case.id) for case in CASES]


def test_every_declared_layer_type_of_every_kind_is_in_the_table() -> None:
    covered = {(case.kind, layer_type(case.shapes)) for case in CASES}
    # a raw parameter (LoRA's target_parameters) has no operation of its own for a one-layer twin to run: it is
    # compared with HF PEFT in tests/test_target_parameters.py
    declared = {(name, t) for name, decl in kinds().items() for t in decl.layer_types if t != "parameter"}
    assert declared <= covered, sorted(declared - covered)


@functools.cache
def capabilities(backend: str) -> peftdecl.Capabilities:
    return peftdecl.backends()[backend].capabilities  # read once: listing backends reads entry points


def needs(backend: str, case: Case, dtype: str | None = None) -> Driver:
    """The backend's driver; a skip when its Capabilities lack the case (or the dtype)."""
    caps = capabilities(backend)
    reason = caps.why_not(case.kind, layer_type(case.shapes))
    if reason:
        pytest.skip(reason)
    found = driver(backend)
    if dtype is not None and dtype not in found.dtypes:
        pytest.skip(f"the {backend} backend's tests run {'/'.join(found.dtypes)}, not {dtype}")
    return found


def twins(
    backend: str, case: Case, dtype: str, seed: int = SEED, **engine_options: Any
) -> tuple[Driver, peftdecl.AdaptedModel, peftdecl.AdaptedModel, np.ndarray]:
    """(driver, the backend's model, the NumPy reference, an input), both models holding the same adapter
    numbers: the reference's seeded initialisation plus noise (so zero-initialised factors are exercised)."""
    run = needs(backend, case, dtype)
    rng = np.random.default_rng(seed)
    state = float32_state(case.shapes, rng)
    x = float32_input(case.shapes, rng)
    reference = peftdecl.attach(
        state, case.spec, backend="numpy", seed=seed, layer_types=case.shapes.layer_types()
    )
    trainable = {k for k, p in reference.plan().param_specs().items() if p.role == "trainable"}
    # float32 numbers held as float64: the NumPy engine keeps the dtype it is given (finite differences need 64)
    arrays = {
        k: v.astype(np.float64) for k, v in perturbed(reference.state_dict(), trainable, 0.1, seed).items()
    }
    options = {"engine_options": engine_options} if engine_options else {}
    base = run.base(case.shapes, state, dtype)
    ours = peftdecl.attach(base, case.spec, backend=backend, seed=seed, **run.options(case.shapes), **options)
    for model in (reference, ours):
        model.delete_adapter("default")
        model.add_adapter("default", case.spec, arrays=arrays, activate=True)
    return run, ours, reference, x


# (dtype, engine options): "unfused" runs the composed ops where the default runs a hand-written fused function
MODES = {
    "float32": ("float32", {}),
    "float64": ("float64", {}),
    "float32-unfused": ("float32", {"fused": False}),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", PARAMS)
def test_output_and_gradients_match_reference(backend: str, case: Case, mode: str) -> None:
    dtype, options = MODES[mode]
    if options and case.kind not in capabilities(backend).fused_kernels:
        pytest.skip(f"the {backend} backend has no fused path for {case.kind}")
    run, ours, reference, x = twins(backend, case, dtype, **options)
    expected, tape = reference.engine.layer_forward("m", x)
    dy = np.random.default_rng(1).normal(size=expected.shape)
    expected_grads = reference.engine.layer_backward("m", tape, dy)
    tol = TOL[dtype]
    assert rel_err(run.forward(ours, x, dtype), expected) <= tol
    if backend == "numpy":  # the reference's own gradients: against finite differences
        if case.spec.get("coft") or case.kind in ("dora", "lora_mha"):
            # COFT overwrites the stored tensor by its projection in each forward; DoRA's backward holds
            # ‖W + sBA‖ constant as HF PEFT does (tests/test_numpy_dora.py checks it with the norm frozen);
            # lora_mha's out_proj factors see half their value's scale, as in PEFT (tests/test_lora_mha.py)
            pytest.skip("by design not the derivative finite differences measure")
        assert check_gradients(ours, "m", x, seed=SEED)
        return
    y, grads = only_m(run.vjp(ours, x, dy, dtype))
    assert rel_err(y, expected) <= tol
    assert set(grads) == {k for k, v in expected_grads.items() if v is not None}
    for key, grad in grads.items():
        assert rel_err(grad, expected_grads[key]) <= tol, key


def only_m(result: tuple[np.ndarray, dict[str, np.ndarray]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The gradients of module ``m``'s tensors and of the input (VeRA's unused ``n`` has zero gradients)."""
    y, grads = result
    return y, {k: v for k, v in grads.items() if k == "input" or k.startswith("m.")}


def highest(run: Driver) -> str:
    return "float64" if "float64" in run.dtypes else run.dtypes[0]


@pytest.mark.parametrize("case", PARAMS)
def test_save_reload_merge_and_unmerge_match_reference(backend: str, case: Case, tmp_path) -> None:
    if not layouts()[
        case.kind
    ].mergeable:  # aLoRA: acts on some positions only; its own module tests save/load
        pytest.skip(f"{case.kind} cannot be merged (as in HF PEFT)")
    dtype = highest(needs(backend, case))
    run, ours, reference, x = twins(backend, case, dtype)
    adapted = run.forward(ours, x, dtype)
    with ours.disable_adapters():
        assert (
            rel_err(adapted, run.forward(ours, x, dtype)) > CHANGED
        )  # the adapter really changes the output

    ours.save(tmp_path / "ad")  # HF layout
    fresh = run.base(case.shapes, float32_state(case.shapes, np.random.default_rng(SEED)), dtype)
    reloaded = peftdecl.load_adapter(fresh, tmp_path / "ad", backend=backend, **run.options(case.shapes))
    assert set(reloaded.state_dict()) == set(ours.state_dict())
    # files hold float32, and COFT's forward has stored its float64 projection before the save
    assert rel_err(run.forward(reloaded, x, dtype), adapted) <= TOL["float32"]

    if case.spec.get("lora_bias") and "m.bias" not in case.shapes.shapes:
        return  # no base bias to merge lora_bias into
    before = ours.base_weight("m")
    ours.merge()
    reference.merge()
    assert rel_err(ours.base_weight("m"), reference.base_weight("m")) <= MERGE_TOL[dtype]
    assert rel_err(run.forward(ours, x, dtype), adapted) <= TOL[dtype]  # merged forward == adapter forward
    ours.unmerge()
    reference.unmerge()
    assert rel_err(ours.base_weight("m"), reference.base_weight("m")) <= MERGE_TOL[dtype]
    if case.kind != "ia3":  # IA3 unmerges by dividing by l + 1e-8 (HF PEFT's rule): not exact
        assert rel_err(ours.base_weight("m"), before) <= MERGE_TOL[dtype]


def check_like_reference(
    run: Driver,
    ours: peftdecl.AdaptedModel,
    reference: peftdecl.AdaptedModel,
    x: np.ndarray,
    dtype: str,
    seed: int = 1,
) -> None:
    """One layer's output and gradients (a random cotangent) on the backend against the reference's."""
    expected, tape = reference.engine.layer_forward("m", x)
    dy = np.random.default_rng(seed).normal(size=expected.shape)
    expected_grads = reference.engine.layer_backward("m", tape, dy)
    y, grads = only_m(run.vjp(ours, x, dy, dtype))
    assert rel_err(y, expected) <= TOL[dtype]
    assert set(grads) == {k for k, v in expected_grads.items() if v is not None}
    for key, grad in grads.items():
        assert rel_err(grad, expected_grads[key]) <= TOL[dtype], key


# Training mode: non-zero dropout of every kind, the backend's draws replayed from the reference's generator.
DROPOUT = {
    "lora": {"lora_dropout": 0.3},
    "dora": {"lora_dropout": 0.3},
    "adalora": {"lora_dropout": 0.3},
    "loha": {"rank_dropout": 0.3, "module_dropout": 0.2},
    "lokr": {"r": 1, "decompose_both": True, "rank_dropout": 0.3, "rank_dropout_scale": True},
    "oft": {"module_dropout": 0.5},
    "boft": {"boft_n_butterfly_factor": 2, "boft_dropout": 0.3},
    "vera": {"vera_dropout": 0.3},
}
DROPOUT_CASES = [
    Case(k, "linear", spec_for(k, "linear", f), kind_layers(k)["linear"], "dropout")
    for k, f in DROPOUT.items()
]


def shared_draws(backend: str, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Make ``backend``'s random draws come from a NumPy generator seeded like the reference's."""
    if backend != "mlx":
        pytest.skip(
            f"the {backend} backend draws its dropout masks from its own generator; nothing replays them"
        )
    from tests.mlx_models import shared_draws as mlx_shared_draws

    mlx_shared_draws(monkeypatch, seed)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in DROPOUT_CASES])
def test_training_mode_with_dropout_matches_reference(backend: str, case: Case, monkeypatch) -> None:
    if backend == "numpy":
        pytest.skip(
            "the reference against itself; its seeded dropout is tested in tests/test_numpy_common.py"
        )
    run, ours, reference, x = twins(backend, case, "float32", seed=5)
    shared_draws(backend, monkeypatch, seed=5)
    evaluated = reference.engine.layer_forward("m", x)[0]
    ours.train()
    reference.train()
    reference.engine.rng = np.random.default_rng(5)
    assert (
        rel_err(reference.engine.layer_forward("m", x)[0], evaluated) > CHANGED
    )  # these draws drop something
    reference.engine.rng = np.random.default_rng(5)
    check_like_reference(run, ours, reference, x, "float32")


def test_coft_projects_the_stored_tensor_during_training_like_the_reference(backend: str) -> None:
    """Two SGD steps: HF PEFT (and the reference) overwrite the parameter by its projection before each use, so
    each step starts from the projected value; the stored tensors agree afterwards."""
    case = next(c for c in CASES if c.variant == "oft_block_share_coft")
    if backend == "numpy":
        pytest.skip("the reference against itself")
    dtype = highest(needs(backend, case))
    run, ours, reference, x = twins(backend, case, dtype)
    ours.train()
    reference.train()
    key, lr = "m.oft_R.weight", 0.3
    dy = np.random.default_rng(0).normal(size=reference.engine.layer_forward("m", x)[0].shape)
    start = reference.state_dict()[key].copy()
    for _ in range(2):
        run.sgd(ours, x, dy, lr, dtype)
        _, tape = reference.engine.layer_forward("m", x)
        reference.trainable_parameters()[key] -= lr * reference.engine.layer_backward("m", tape, dy)[key]
    assert rel_err(reference.state_dict()[key], start) > 1e-2
    assert rel_err(ours.state_dict()[key], reference.state_dict()[key]) <= TOL[dtype]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dims=st.tuples(st.integers(2, 9), st.integers(1, 9), st.integers(1, 4)),  # in, out, rank
    dora=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_linear_lora_and_dora_match_reference(backend, dims, dora, bias, seed) -> None:
    d_in, d_out, r = dims
    shapes = {"m.weight": (d_out, d_in), **({"m.bias": (d_out,)} if bias else {})}
    spec = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "use_dora": dora, "init_lora_weights": False,
            "target_modules": ["m"]}  # fmt: skip
    case = Case("dora" if dora else "lora", "linear", spec, Layer(shapes, "linear", (3, d_in)))
    if backend == "numpy":
        pytest.skip("the reference against itself")
    dtype = needs(backend, case).dtypes[0]
    run, ours, reference, x = twins(backend, case, dtype, seed=seed)
    check_like_reference(run, ours, reference, x, dtype, seed=seed + 1)


# Backend-internal paths the tiny layers would not take, forced: (module, attribute, value)
FORCED_PATHS = {("mlx", "dora"): ("peftdecl_mlx.kinds.dora", "FORM_LIMIT", 0)}  # DoRA's factored norm


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.kind == "dora"])
def test_forced_paths_match_reference(backend: str, case: Case, monkeypatch) -> None:
    forced = FORCED_PATHS.get((backend, case.kind))
    if forced is None:
        pytest.skip(f"no forced path for {case.kind} on the {backend} backend")
    dtype = highest(needs(backend, case))
    module, attribute, value = forced
    monkeypatch.setattr(f"{module}.{attribute}", value)
    check_like_reference(*twins(backend, case, dtype), dtype)
