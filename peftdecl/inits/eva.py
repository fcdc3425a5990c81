"""EVA (Explained Variance Adaptation, HF PEFT's ``init_lora_weights="eva"``): A from the inputs each layer sees.

Per targeted linear layer the inputs of a few batches (the adapters off) are folded into an incremental SVD
(:class:`~peftdecl.inits.incremental_svd.IncrementalSVD`) with up to k = round(rho·r) components, until each
component's direction stops moving (cosine with the last batch's ≥ tau). The rank budget Σ r then goes to the
components with the largest explained-variance ratios over all layers, so a layer ends with r' ∈ [0, k] ranks;
A = its top r' right singular vectors (÷ √S with ``whiten``), B = 0, alpha × r'/r with
``adjust_scaling_factors``; a layer given no rank loses its adapter. Layers receiving the same inputs share one
SVD. The batches are run by the backend (``<backend package>.activations``); this module holds the arithmetic.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from itertools import cycle

import numpy as np

from peftdecl.errors import PeftdeclError, TargetError
from peftdecl.inits.incremental_svd import IncrementalSVD, row_cosines
from peftdecl.plan.ir import LayerPlan, Plan
from peftdecl.spec.data_inits import EvaConfig

RecordInputs = Callable[[object, frozenset[str]], Mapping[str, list[np.ndarray]]]
"""(batch, module names) -> each module's 2-D input rows, one array per call of the module in that forward pass."""

EVA_LAYER_TYPES = ("linear", "gpt2_conv1d")
"""The layers EVA computes A for; PEFT leaves the rest of the adapter's layers at LoRA's default init."""

_RHO_CAP = 1000.0  # above it, PEFT bounds rho by the largest parameter dimension / r


def check_eva_layers(plan: Plan) -> None:
    """Refuse what HF PEFT refuses: a convolution with ``init_lora_weights='eva'`` ("Unknown initialization")."""
    for layer in plan.layers:
        if layer.layer.is_conv:
            raise TargetError(
                f"{layer.module}: init_lora_weights='eva' works on linear layers (and leaves embeddings and "
                f"attention at LoRA's default), not on this {layer.layer.type} layer"
            )
        if layer.layer.quantization is not None and layer.layer.type in EVA_LAYER_TYPES:
            raise TargetError(
                f"{layer.module}: init_lora_weights='eva' on a quantised ({layer.layer.quantization}) base is not "
                "supported by peftdecl"
            )


def eva_targets(plan: Plan) -> dict[str, LayerPlan]:
    """The plan's layers EVA initialises (linear and GPT-2 Conv1D), by module name."""
    return {lp.module: lp for lp in plan.layers if lp.layer.type in EVA_LAYER_TYPES}


def components_per_layer(
    ranks: Mapping[str, int], rho: float, max_parameter_dim: int, r: int
) -> dict[str, int]:
    """k = round(r_layer · rho) SVD components per layer; a rho above 1000 is first bounded by max_dim // r."""
    if rho > _RHO_CAP:
        rho = min(rho, max_parameter_dim // r)
    return {name: round(rank * rho) for name, rank in ranks.items()}


def equal_input_groups(first_inputs: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Module -> the first module (in order) whose first input is identical to its own, for every later one."""
    first_of: dict[bytes, str] = {}
    same: dict[str, str] = {}
    for name, rows in first_inputs.items():
        key = repr((rows.shape, rows.dtype.str)).encode() + np.ascontiguousarray(rows).tobytes()
        if key in first_of:
            same[name] = first_of[key]
        else:
            first_of[key] = name
    return same


def rank_distribution(
    ratios: Mapping[str, np.ndarray],
    layer_svd: Mapping[str, str],
    same_input: Mapping[str, str],
    budget: int,
    max_components: Mapping[str, int],
) -> dict[str, int]:
    """Each layer's rank: how many of the ``budget`` largest explained-variance ratios (over every layer's first
    k) are its own; of layers with equal inputs the one holding the SVD gets the larger count."""
    keys = [name for name, svd in layer_svd.items() for _ in ratios[svd][: max_components[name]]]
    values = np.concatenate([ratios[svd][: max_components[name]] for name, svd in layer_svd.items()])
    order = np.argsort(-values, kind="stable")
    counts = Counter(keys[i] for i in order[:budget])
    ranks = {name: counts.get(name, 0) for name in layer_svd}
    for name, svd in same_input.items():
        if ranks[svd] < ranks[name]:
            ranks[svd], ranks[name] = ranks[name], ranks[svd]
    return ranks


def eva_components(
    ranks: Mapping[str, int],
    config: EvaConfig,
    batches: Iterable[object],
    record: RecordInputs,
    max_parameter_dim: int,
    r: int,
    max_steps: int | None = None,
) -> dict[str, np.ndarray]:
    """Module -> EVA's A (r' × features) for the layers in ``ranks`` (module -> its LoRA rank), fitted to the
    inputs ``record`` returns for the ``batches`` (cycled until every needed component has converged)."""
    batches = list(batches) if not isinstance(batches, (list, tuple)) else batches
    if not batches:
        raise PeftdeclError("EVA needs at least one batch; the dataloader is empty")
    max_components = components_per_layer(ranks, config.rho, max_parameter_dim, r)
    first = record(batches[0], frozenset(ranks))
    missing = [name for name in ranks if not first.get(name)]
    if missing:
        raise PeftdeclError(f"EVA: the forward pass did not call {missing}; their inputs cannot be collected")
    same_input = equal_input_groups({name: first[name][0] for name in ranks})
    for svd_name in set(same_input.values()):
        group = [svd_name, *(n for n, s in same_input.items() if s == svd_name)]
        shared = max(max_components[n] for n in group)
        for name in group:
            max_components[name] = shared
    svds = {name: IncrementalSVD(max_components[name]) for name in ranks if name not in same_input}
    converged = {name: np.zeros(max_components[name], dtype=bool) for name in svds}
    layer_svd = {**{name: name for name in svds}, **same_input}
    done = dict.fromkeys(svds, False)
    recording = set(svds)
    distribution = dict(max_components)
    for step, batch in enumerate(cycle(batches)):
        for name in svds:
            needed = bool(np.all(converged[name][: distribution[name]]))
            if not done[name] and needed:
                done[name] = True
                recording.discard(name)
            elif done[name] and not needed:
                done[name] = False
                recording.add(name)
        if all(done.values()):
            break
        if max_steps is not None and step >= max_steps:
            raise PeftdeclError(f"EVA: {sorted(recording)} did not converge in {max_steps} batches")
        recorded = record(batch, frozenset(recording))
        for name in svds:  # in the adapter's layer order, whatever order the backend returned
            for rows in recorded.get(name, ()):
                _fit(name, svds[name], rows, converged, config.tau)
        if any(svd.components is None for svd in svds.values()):
            if step + 1 >= len(batches):  # PEFT would cycle for ever: no batch has enough rows for the SVD
                empty = sorted(n for n, svd in svds.items() if svd.components is None)
                raise PeftdeclError(
                    f"EVA: no batch gives {empty} as many input rows as SVD components (rho·r)"
                )
            continue
        ratios = {name: svd.explained_variance_ratio for name, svd in svds.items()}
        distribution = rank_distribution(ratios, layer_svd, same_input, sum(ranks.values()), max_components)
    out: dict[str, np.ndarray] = {}
    for name, rank in distribution.items():
        svd = svds[layer_svd[name]]
        assert svd.components is not None
        a = svd.components[:rank].copy()
        if config.whiten:
            a /= np.sqrt(svd.singular_values[:rank])[:, None]
        out[name] = a
    return out


def _fit(
    name: str, svd: IncrementalSVD, rows: np.ndarray, converged: dict[str, np.ndarray], tau: float
) -> None:
    features = rows.shape[1]
    if svd.n_components > features:
        raise TargetError(
            f"{name}: EVA needs {svd.n_components} components (round(rho·r)) but the layer has only {features} "
            "input features; lower eva_config.rho or r"
        )
    if rows.shape[0] < svd.n_components:
        return  # as PEFT: a batch with fewer rows than components is skipped
    previous = svd.components
    svd.partial_fit(rows)
    if previous is not None and svd.components is not None:
        converged[name] = row_cosines(svd.components, previous) >= tau


def eva_adapter(
    plan: Plan,
    arrays: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray],
) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """The adapter after EVA: spec changes (target_modules, rank_pattern, alpha_pattern, as PEFT writes them) and
    the tensors, A from ``state`` (module -> r' × in) and B = 0 where a layer has an entry, the current ones
    elsewhere; a layer with r' = 0 is left out."""
    spec = plan.spec
    config = getattr(spec, "eva_config", None) or EvaConfig()
    state = {k.removeprefix("base_model.model."): np.asarray(v) for k, v in state.items()}
    global_r, global_alpha = int(getattr(spec, "r", 8)), float(getattr(spec, "lora_alpha", 8))
    layer_keys = {layer.key(p.name) for layer in plan.layers for p in layer.params}
    out = {k: np.asarray(v) for k, v in arrays.items() if k not in layer_keys}  # e.g. modules_to_save copies
    kept: list[str] = []
    without: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for layer in plan.layers:
        own = {
            layer.key(p.name): arrays[layer.key(p.name)] for p in layer.params if layer.key(p.name) in arrays
        }
        rank, alpha = layer.r, float(layer.alpha)
        if layer.module in state:
            a = state.pop(layer.module)
            if a.ndim != 2 or a.shape[1] != layer.layer.in_features:
                raise TargetError(
                    f"{layer.module}: the EVA state has shape {a.shape}; expected (rank, {layer.layer.in_features})"
                )
            new_rank = a.shape[0]
            if new_rank == 0:
                continue
            if new_rank != rank and config.adjust_scaling_factors:
                alpha *= new_rank / rank
            own[layer.key("lora_A.weight")] = a
            own[layer.key("lora_B.weight")] = np.zeros((layer.layer.out_features, new_rank))
            kept.append(layer.module)
            rank = new_rank
        else:
            without.append(layer.module)
        out.update(own)
        if rank != global_r:
            rank_pattern[layer.module] = rank
        if alpha != global_alpha:
            alpha_pattern[layer.module] = alpha
    if state:
        raise TargetError(f"the EVA state names modules without this adapter: {sorted(state)}")
    if without:
        warnings.warn(
            f"EVA left {without} at init_lora_weights=True: EVA computes A for linear layers only",
            stacklevel=3,
        )
    changes: dict[str, object] = {
        "target_modules": tuple(kept + without),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    return changes, out
