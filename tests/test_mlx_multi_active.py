"""Several active adapters on one layer on the MLX backend, for the kinds that are not simply summed (DoRA, IA3,
OFT, BOFT), against the float64 NumPy reference holding the same numbers (which is checked against HF PEFT through
the torch backend in test_torch_multi_active.py).

Tolerances (float32 MLX against the float64 reference, relative): outputs and gradients of every trainable tensor
and of the input ≤ 1e-5; merged weights ≤ 1e-6, and unmerge restores the base weight to ≤ 1e-6 (IA3, whose unmerge
divides by l + 1e-8: ≤ 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest

from peftdecl.equiv import perturbed
from tests.conftest import rel_err
from tests.mlx_models import Tiny, assert_vjp_like_reference, twin

LAYER_TOL = 1e-5
MERGE_TOL = 1e-6
IA3_UNMERGE_TOL = 1e-5

LORA = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "init_lora_weights": False}
DORA = {**LORA, "use_dora": True}
IA3 = {"peft_type": "IA3", "init_ia3_weights": False}
OFT = {"peft_type": "OFT", "r": 0, "init_weights": False}
BOFT = {"peft_type": "BOFT", "boft_block_size": 2, "init_weights": False}
QD = ["q_proj", "down_proj"]

# case -> the adapters' specs in active order, and the modules they all target
STACKS = {
    "dora+dora": ([DORA, {**DORA, "r": 2, "lora_alpha": 3}], ["q_proj", "embed_tokens"]),
    "lora+dora": ([LORA, DORA], ["q_proj"]),
    "ia3+ia3": ([{**IA3, "feedforward_modules": ["down_proj"]}] * 2, QD),
    "ia3_ff+ia3": ([{**IA3, "feedforward_modules": ["down_proj"]}, {**IA3, "feedforward_modules": []}], QD),
    "oft+oft": (
        [{**OFT, "oft_block_size": 4}, {**OFT, "oft_block_size": 2, "use_cayley_neumann": False}],
        [*QD, "embed_tokens"],
    ),
    "boft+boft": ([{**BOFT, "boft_n_butterfly_factor": 2}, BOFT], QD),
}
CASES = [(case, module) for case, (_, modules) in STACKS.items() for module in modules]


def build(case: str):
    """(MLX model, NumPy reference) with the adapters of ``case`` as ``a0``, ``a1``, all active, holding the same
    perturbed numbers (DoRA magnitudes included, so g ≠ 1)."""
    specs, modules = STACKS[case]
    specs = [{**spec, "target_modules": modules} for spec in specs]
    ours, ref = twin(Tiny(), specs[0], name="a0")
    for i, spec in enumerate(specs[1:], start=1):
        name = f"a{i}"
        ref.add_adapter(name, spec, seed=1 + i)
        trainable = {k for k, p in ref.plan(name).param_specs().items() if p.role == "trainable"}
        arrays = perturbed(ref.state_dict(name), trainable, 0.1, 1 + i)
        for model in (ref, ours):
            if name in model.adapters:
                model.delete_adapter(name)
            model.add_adapter(name, spec, arrays=arrays)
    names = [f"a{i}" for i in range(len(specs))]
    ours.set_adapter(names)
    ref.set_adapter(names)
    ours.eval()  # an mlx.nn.Module starts in training mode
    return ours, ref


@pytest.mark.parametrize(("case", "module"), CASES)
def test_layer_output_and_gradients_match_reference(case: str, module: str) -> None:
    ours, ref = build(case)
    rng = np.random.default_rng(0)
    x = (
        rng.integers(0, 13, size=(2, 3))
        if module == "embed_tokens"
        else rng.normal(size=(2, 3, 16 if module == "q_proj" else 12))
    )
    assert_vjp_like_reference(ours, ref, module, x, LAYER_TOL)


@pytest.mark.parametrize("case", sorted(STACKS))
def test_merge_in_turn_matches_reference_and_unmerge_restores(case: str) -> None:
    ours, ref = build(case)
    modules = STACKS[case][1]
    before = {m: ours.base_weight(m) for m in modules}
    ours.merge()
    ref.merge()
    for m in modules:
        assert rel_err(ours.base_weight(m), ref.base_weight(m)) <= MERGE_TOL, m
    ours.unmerge()
    ref.unmerge()
    # IA3 unmerges by dividing by l + 1e-8 (HF PEFT's rule), in float32 here: restored to IA3_UNMERGE_TOL
    restore_tol = IA3_UNMERGE_TOL if case.startswith("ia3") else MERGE_TOL
    for m in modules:
        assert rel_err(ours.base_weight(m), ref.base_weight(m)) <= restore_tol, m
        assert rel_err(ours.base_weight(m), before[m]) <= restore_tol, m
