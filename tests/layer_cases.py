"""One-layer fixtures: per adapter kind, the layers it is tested on (random base tensors of module ``m``, the
layer type, an input shape), the spec the NumPy-reference tests start from, and the spec variants several tests
share. tests/test_backend_kinds.py builds the same layers on every backend.

``build(kind, layer)`` attaches that kind's adapter, randomly initialised, and draws an input for the layer.
The random numbers depend only on ``seed``: base tensors, then (DoRA) the magnitude scaling, then the input,
all from ``np.random.default_rng(seed)``. The small helpers below compute what tests compare (the base output,
an adapter's change, the merged weight applied densely) and assert nothing but the finite-difference gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

import peftdecl
from peftdecl.plan.kinds.dora import MAGNITUDE
from tests.gradcheck import check_gradients


class Layer(NamedTuple):
    """A base model with the adapted module ``m`` (VeRA: ``m`` and ``n``) and an input for it."""

    shapes: dict[str, tuple[int, ...]]  # base tensors, drawn from N(0, 1)
    # of every module in ``shapes``; None: no layer_types, so a 2-D weight is a linear layer
    layer_type: str | dict | None
    x_shape: tuple[int, ...]  # an embedding's input is token ids below its number of rows

    def layer_types(self) -> dict[str, Any]:
        modules = outer_modules(self.shapes)
        return {} if self.layer_type is None else dict.fromkeys(modules, self.layer_type)

    def random_state(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {key: rng.normal(size=shape) for key, shape in self.shapes.items()}

    def random_input(self, rng: np.random.Generator) -> np.ndarray:
        if self.layer_type == "embedding":
            return rng.integers(0, self.shapes["m.weight"][0], size=self.x_shape)
        return rng.normal(size=self.x_shape)


def outer_modules(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The modules owning the tensors, without those inside another (an attention's ``m.out_proj``)."""
    found = sorted({key.rsplit(".", 1)[0] for key in shapes})
    return [m for m in found if not any(m.startswith(o + ".") for o in found)]


CONV1D_STRIDED = {"type": "conv1d", "padding": 1, "stride": 2}
CONV2D_DILATED = {"type": "conv2d", "padding": 1, "dilation": 2}
CONV2D_GROUPED = {"type": "conv2d", "groups": 2, "stride": [2, 1]}
CONV2D_STRIDED = {"type": "conv2d", "padding": 1, "stride": 2}

# layers several kinds share
LINEAR = Layer({"m.weight": (6, 5), "m.bias": (6,)}, "linear", (4, 5))
CONV1D = Layer({"m.weight": (4, 3, 3), "m.bias": (4,)}, CONV1D_STRIDED, (2, 3, 9))
CONV2D = Layer({"m.weight": (4, 3, 3, 3), "m.bias": (4,)}, {"type": "conv2d", "padding": 1}, (2, 3, 5, 5))
CONV2D_1X1 = Layer({"m.weight": (4, 3, 1, 1)}, "conv2d", (2, 3, 4, 4))
CONV2D_GROUPS = Layer({"m.weight": (4, 2, 3, 2)}, CONV2D_GROUPED, (2, 4, 5, 5))
CONV3D_STRIDED = {"type": "conv3d", "padding": 1, "stride": [2, 1, 1]}
CONV3D = Layer({"m.weight": (3, 2, 2, 2, 2), "m.bias": (3,)}, CONV3D_STRIDED, (2, 2, 3, 3, 4))
GPT2_CONV1D = Layer({"m.weight": (5, 6), "m.bias": (6,)}, "gpt2_conv1d", (4, 5))
# torch's nn.MultiheadAttention(4, 2): in_proj [3E, E] and out_proj [E, E], input [L, N, E]
MHA_SHAPES = {
    "m.in_proj_weight": (12, 4),
    "m.in_proj_bias": (12,),
    "m.out_proj.weight": (4, 4),
    "m.out_proj.bias": (4,),
}
MHA = Layer(MHA_SHAPES, {"type": "mha", "num_heads": 2}, (3, 2, 4))
LINEAR_8_IN = Layer({"m.weight": (5, 8), "m.bias": (5,)}, "linear", (3, 8))  # widths the OFT blocks divide

LORA_LAYERS = {
    "linear": LINEAR,
    "embedding": Layer({"m.weight": (11, 5)}, "embedding", (2, 4)),
    "conv1d": CONV1D,
    "conv2d": CONV2D,
    "conv2d_1x1": CONV2D_1X1,
    "conv3d": CONV3D,
    "gpt2_conv1d": GPT2_CONV1D,
}
ADALORA_LAYERS = {
    "linear": LINEAR,
    "conv2d": Layer(
        {"m.weight": (4, 3, 3, 3), "m.bias": (4,)}, {**CONV2D_STRIDED, "dilation": 1}, (2, 3, 6, 6)
    ),
    "conv2d_dilated": Layer(
        {"m.weight": (4, 2, 3, 2)}, {"type": "conv2d", "padding": [2, 1], "dilation": 2}, (1, 2, 7, 6)
    ),
    "conv2d_1x1": CONV2D_1X1,
    "gpt2_conv1d": GPT2_CONV1D,
}
ADALORA_MASK = {"rank_pattern": {"m.lora_E": [True, False, True]}}  # prunes the second of three triplets
LOHA_LAYERS = {
    "linear": LINEAR,
    "conv1d": CONV1D,
    "conv1d_k1": Layer({"m.weight": (4, 3, 1)}, "conv1d", (2, 3, 5)),
    "conv2d": Layer({"m.weight": (4, 3, 3, 3), "m.bias": (4,)}, CONV2D_DILATED, (2, 3, 6, 6)),
    "conv2d_groups": CONV2D_GROUPS,
    "conv2d_1x1": CONV2D_1X1,
}
# LoKr's Kronecker factors want composite widths
LOKR_LAYERS = {
    "linear": Layer({"m.weight": (12, 8), "m.bias": (12,)}, "linear", (3, 8)),
    "conv1d": Layer({"m.weight": (4, 6, 3), "m.bias": (4,)}, CONV1D_STRIDED, (2, 6, 9)),
    "conv1d_k1": Layer({"m.weight": (4, 6, 1)}, "conv1d", (2, 6, 5)),
    "conv2d": Layer({"m.weight": (6, 4, 3, 3), "m.bias": (6,)}, CONV2D_DILATED, (2, 4, 6, 6)),
    "conv2d_groups": CONV2D_GROUPS,
    "conv2d_1x1": Layer({"m.weight": (6, 4, 1, 1)}, "conv2d", (2, 4, 4, 4)),
}
# r = 8: both factors full; r = 1: w2 factored (CP core with use_effective_conv2d); decompose_both: w1 as well
LOKR_VARIANTS = {
    "full": {"r": 8},
    "w2_low_rank": {"r": 1},
    "cp": {"r": 1, "use_effective_conv2d": True},
    "both": {"r": 1, "decompose_both": True},
    "factor": {"r": 1, "decompose_both": True, "decompose_factor": 2},
}
IA3_LAYERS = {
    "linear": Layer({"m.weight": (6, 5), "m.bias": (6,)}, "linear", (3, 4, 5)),
    "conv2d": CONV2D,
    "conv2d_grouped": Layer({"m.weight": (4, 1, 3, 3)}, {**CONV2D_GROUPED, "stride": 2}, (2, 2, 5, 5)),
    "conv3d": CONV3D,
    "gpt2_conv1d": GPT2_CONV1D,
}
OFT_LAYERS = {
    "linear": LINEAR_8_IN,
    "embedding": Layer({"m.weight": (11, 8)}, "embedding", (2, 3)),
    "conv2d": Layer({"m.weight": (3, 2, 3, 3), "m.bias": (3,)}, CONV2D_STRIDED, (2, 2, 5, 5)),
    "conv2d_1x1": Layer({"m.weight": (3, 4, 1, 1)}, "conv2d", (2, 4, 3, 3)),
}
OFT_BLOCK_SIZE = {"linear": 4, "embedding": 4, "conv2d": 6, "conv2d_1x1": 2}  # oft_block_size per layer
OFT_VARIANTS = {
    "neumann": {},
    "exact": {"use_cayley_neumann": False},
    "neumann_3_terms": {"num_cayley_neumann_terms": 3},
    "neumann_7_terms": {"num_cayley_neumann_terms": 7},
    "block_share": {"block_share": True},
    "module_dropout": {"module_dropout": 0.5},
}
BOFT_LAYERS = {
    "linear": LINEAR_8_IN,
    "conv2d": Layer({"m.weight": (3, 2, 2, 2), "m.bias": (3,)}, CONV2D_STRIDED, (2, 2, 5, 5)),
    "conv2d_1x1": Layer({"m.weight": (3, 8, 1, 1)}, "conv2d", (2, 8, 3, 3)),
}
BOFT_VARIANTS = {
    "one_factor": {"boft_block_size": 2},
    "two_factors": {"boft_block_size": 2, "boft_n_butterfly_factor": 2},
    "three_factors": {"boft_block_size": 2, "boft_n_butterfly_factor": 3},
    "block_num": {"boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 2},
    "dropout": {"boft_block_size": 2, "boft_n_butterfly_factor": 2, "boft_dropout": 0.5},
}
# named spec variants the kind registry's one example per layer type does not reach: name -> (kind, fields);
# tests/test_backend_kinds.py runs them on every backend, tests/torch_cases.py names them for the torch tests
SPEC_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora_rslora": ("lora", {"use_rslora": True}),
    "lora_bias": ("lora", {"lora_bias": True}),
    "adalora_masked": ("adalora", ADALORA_MASK),
    "ia3_feedforward": ("ia3", {"feedforward_modules": ["m"]}),
    "loha_effective": ("loha", {"r": 2, "use_effective_conv2d": True}),
    "lokr_full": ("lokr", LOKR_VARIANTS["full"]),
    "lokr_decomposed": ("lokr", LOKR_VARIANTS["both"]),
    "lokr_effective": ("lokr", LOKR_VARIANTS["cp"]),
    "oft_exact_cayley": ("oft", OFT_VARIANTS["exact"]),
    "oft_block_share_coft": ("oft", {"block_share": True, "coft": True, "eps": 0.5}),
    "boft_butterfly": ("boft", {"boft_n_butterfly_factor": 2}),
}
# two layers of different shapes, so the shared projections are cut differently for each
VERA_LAYERS = {
    "linear": Layer({"m.weight": (6, 5), "m.bias": (6,), "n.weight": (3, 7)}, None, (4, 5)),
    "gpt2_conv1d": Layer({"m.weight": (5, 6), "m.bias": (6,), "n.weight": (7, 3)}, "gpt2_conv1d", (2, 3, 5)),
}


def scale_dora_magnitude(model: peftdecl.AdaptedModel, spec: dict, rng: np.random.Generator) -> None:
    """Move a randomly initialised DoRA magnitude m off ‖W + sBA‖, so that g ≠ 1."""
    if spec["init_lora_weights"] is False:
        magnitude = model.trainable_parameters()[f"m.{MAGNITUDE}"]
        magnitude *= rng.uniform(0.5, 1.5, size=magnitude.shape)


class Kind(NamedTuple):
    """How one kind's one-layer tests attach it."""

    spec: dict[str, Any]  # the spec each test starts from: a random (not no-op) initialisation
    layers: dict[str, Layer]
    layer_fields: dict[str, dict[str, Any]] | None = None  # spec fields that depend on the layer
    # run on the attached model, with its spec and the random generator, before the input is drawn
    prepare: Callable[[peftdecl.AdaptedModel, dict, np.random.Generator], None] | None = None


LORA_SPEC = {
    "peft_type": "LORA",
    "r": 3,
    "lora_alpha": 6,
    "target_modules": ["m"],
    "init_lora_weights": False,
}
KINDS = {
    "lora": Kind(LORA_SPEC, LORA_LAYERS),
    "dora": Kind({**LORA_SPEC, "use_dora": True}, LORA_LAYERS, prepare=scale_dora_magnitude),
    "adalora": Kind(
        {
            "peft_type": "ADALORA",
            "init_r": 3,
            "target_r": 2,
            "lora_alpha": 6,
            "total_step": 10,
            "target_modules": ["m"],
            "init_lora_weights": False,
        },
        ADALORA_LAYERS,
    ),
    "vera": Kind(
        {"peft_type": "VERA", "r": 3, "target_modules": ["m", "n"], "init_weights": False}, VERA_LAYERS
    ),
    "loha": Kind(
        {"peft_type": "LOHA", "r": 3, "alpha": 6, "target_modules": ["m"], "init_weights": False}, LOHA_LAYERS
    ),
    "lokr": Kind(
        {"peft_type": "LOKR", "r": 3, "alpha": 5, "target_modules": ["m"], "init_weights": False}, LOKR_LAYERS
    ),
    "ia3": Kind({"peft_type": "IA3", "target_modules": ["m"], "init_ia3_weights": False}, IA3_LAYERS),
    "oft": Kind(
        {"peft_type": "OFT", "target_modules": ["m"], "init_weights": False},
        OFT_LAYERS,
        {layer: {"oft_block_size": size} for layer, size in OFT_BLOCK_SIZE.items()},
    ),
    "boft": Kind({"peft_type": "BOFT", "target_modules": ["m"], "init_weights": False}, BOFT_LAYERS),
    "lora_mha": Kind(LORA_SPEC, {"mha": MHA}),
}


def build(
    kind: str,
    layer: str,
    seed: int = 0,
    *,
    state: dict[str, np.ndarray] | None = None,
    prepare: bool = True,
    **fields: Any,
) -> tuple[peftdecl.AdaptedModel, np.ndarray]:
    """``kind``'s adapter (its default spec updated by ``fields``) on ``layer`` of its table, and an input.

    ``state`` replaces the random base tensors (none are drawn then); ``prepare=False`` skips the kind's
    ``prepare`` step."""
    entry = KINDS[kind]
    case = entry.layers[layer]
    rng = np.random.default_rng(seed)
    spec = {**entry.spec, **(entry.layer_fields or {}).get(layer, {}), **fields}
    model = peftdecl.attach(state or case.random_state(rng), spec, layer_types=case.layer_types(), seed=seed)
    if prepare and entry.prepare is not None:
        entry.prepare(model, spec, rng)
    return model, case.random_input(rng)


def layer_params(model: peftdecl.AdaptedModel, module: str = "m") -> dict[str, np.ndarray]:
    """One module's adapter tensors, named without the module prefix (``lora_A.weight``, ``hada_w1_a``, …)."""
    return {k[len(module) + 1 :]: v for k, v in model.state_dict().items() if k.startswith(module + ".")}


def base_output(model: peftdecl.AdaptedModel, x: np.ndarray, module: str = "m") -> np.ndarray:
    """The module's output with every adapter disabled."""
    with model.disable_adapters():
        return model(module, x)


def adapter_deltas(
    model: peftdecl.AdaptedModel, x: np.ndarray, names: tuple[str, ...] = ("default", "b")
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The base output of module ``m``, and each named adapter's change to it when active alone."""
    base = base_output(model, x)
    deltas = {}
    for name in names:
        model.set_adapter(name)
        deltas[name] = model("m", x) - base
    return base, deltas


def random_layer(
    rng: np.random.Generator, d_out: int, d_in: int, kernel: tuple[int, ...] | None
) -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray]:
    """A bias-free module ``m``: linear (``kernel`` None) or a convolution with that kernel, padded by 1; its
    base tensors, its layer_types and an input (3 rows, or 2 samples of spatial size 4), drawn in that order."""
    if kernel is None:
        return {"m.weight": rng.normal(size=(d_out, d_in))}, {"m": "linear"}, rng.normal(size=(3, d_in))
    state = {"m.weight": rng.normal(size=(d_out, d_in, *kernel))}
    layer_type = {"type": f"conv{len(kernel)}d", "padding": 1}
    return state, {"m": layer_type}, rng.normal(size=(2, d_in, *(4,) * len(kernel)))


def dense_merged_output(model: peftdecl.AdaptedModel, x: np.ndarray, module: str = "m") -> np.ndarray:
    """x Wᵀ + b for a linear ``module``, with W and b from merge_and_unload(): the merged weight applied as a
    dense matrix. Merges the model."""
    merged = model.merge_and_unload()
    return x @ merged[f"{module}.weight"].T + merged.get(f"{module}.bias", 0.0)


def check_unmerged_gradients(
    model: peftdecl.AdaptedModel, x: np.ndarray, seed: int, module: str = "m"
) -> None:
    """Unmerge, switch to training mode and compare every gradient of ``module`` with central differences
    (tests/gradcheck.py)."""
    model.unmerge()
    model.train()
    check_gradients(model, module, x, seed=seed)
