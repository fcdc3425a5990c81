"""Trainable-tokens layout: one tensor ``trainable_tokens_delta`` [n_tokens, dim] per adapted embedding, holding
the new rows E'[t] of the chosen tokens t (HF PEFT's name; the values are rows, not differences).

The standalone kind (``TRAINABLE_TOKENS``) adapts its ``target_modules``; a LoRA-family spec with
``trainable_token_indices`` adds such a layer, under HF PEFT's name ``token_adapter.trainable_tokens_delta``, to
each embedding the field names (see :func:`lora_token_layers`). ``init_weights`` true starts from the current
rows (E'[t] = E[t], a no-op); false draws N(0, 1) rows as PEFT's ``torch.randn``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from peftdecl.errors import TargetError
from peftdecl.init import register_external_source
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec
from peftdecl.plan.kinds import KindLayout
from peftdecl.spec._base import SpecBase
from peftdecl.spec.trainable_tokens import TrainableTokensSpec

KIND = "trainable_tokens"
STANDALONE_TENSOR = "trainable_tokens_delta"
LORA_TENSOR = "token_adapter.trainable_tokens_delta"
ROWS_SOURCE = "token_rows"
DEFAULT_EMBEDDING = "embed_tokens"  # HF PEFT's fallback when the model names no input embeddings


def token_rows_and_dim(layer: LayerInfo) -> tuple[int, int]:
    """(rows, row length) of the weight whose rows are tokens: an embedding's [vocab, dim], a linear [out, in]."""
    if layer.type == "embedding":
        return layer.in_features, layer.out_features
    return layer.out_features, layer.in_features


def token_layer(
    module: str, layer: LayerInfo, indices: Sequence[int], tensor: str, init_weights: bool, field: str
) -> LayerPlan:
    """The layer plan of trainable rows ``indices`` on ``module`` (``field`` names the spec field in errors)."""
    if layer.type not in ("embedding", "linear"):
        raise TargetError(f"{field}: {module} is a {layer.type} layer; trainable tokens adapt embeddings")
    rows, dim = token_rows_and_dim(layer)
    outside = [t for t in indices if t >= rows]
    if outside:
        raise TargetError(f"{field}: token indices {outside[:10]} are outside {module}'s {rows} rows")
    init = Init("external", source=ROWS_SOURCE) if init_weights else Init("normal", std=1.0)
    return LayerPlan(
        module=module,
        layer=layer,
        kind=KIND,
        params=(ParamSpec(tensor, (len(indices), dim), "trainable", init),),
        options={"token_indices": tuple(int(t) for t in indices), "tensor": tensor},
    )


def build_token_layer(spec: TrainableTokensSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """One embedding (or tied linear head) of a standalone TRAINABLE_TOKENS adapter."""
    return token_layer(
        module, layer, spec.token_indices, STANDALONE_TENSOR, spec.init_weights, "$.token_indices"
    )


def prepare_standalone(spec: SpecBase, info: ModelInfo) -> SpecBase:
    """Null ``target_modules`` becomes the input embeddings' name (a full-match pattern), as HF PEFT resolves and
    saves it."""
    if getattr(spec, "target_modules", None) is not None:
        return spec
    return spec.replace(target_modules=info.word_embeddings or DEFAULT_EMBEDDING)


def lora_token_layers(spec: SpecBase, info: ModelInfo, adapted: Sequence[LayerPlan]) -> list[LayerPlan]:
    """The token layers of a LoRA-family spec's ``trainable_token_indices``: a list of ids adapts the input
    embeddings, a mapping {name: ids} every module whose name ends with ``name`` (HF PEFT's raw suffix test).
    Their rows start at the current values (PEFT offers no random start here)."""
    wanted = getattr(spec, "trainable_token_indices", None)
    if wanted is None:
        return []
    field = "$.trainable_token_indices"
    by_name: Mapping[str, Sequence[int]] = (
        wanted if isinstance(wanted, Mapping) else {info.word_embeddings or DEFAULT_EMBEDDING: wanted}
    )
    saved = set(spec.modules_to_save or ())
    taken = {lp.module for lp in adapted}
    layers: list[LayerPlan] = []
    for name, indices in by_name.items():
        path = f"{field}.{name}" if isinstance(wanted, Mapping) else field
        if name in saved:
            raise TargetError(f"{path}: {name} is in modules_to_save (trained in full); name it in only one")
        found = [m for m in info.modules if m.endswith(name)]
        if not found:
            raise TargetError(f"{path}: no module of the model is named {name!r}")
        for module in found:
            if module in taken:
                raise TargetError(
                    f"{path}: {module} is also in target_modules; peftdecl does not stack trainable tokens "
                    "and LoRA on one layer"
                )
            if module not in info.layers:
                raise TargetError(f"{path}: {module} is not an embedding layer")
            layers.append(token_layer(module, info.layers[module], indices, LORA_TENSOR, True, path))
            taken.add(module)
    return layers


def _current_rows(weight: np.ndarray, lp: LayerPlan, own: Mapping[str, np.ndarray]) -> np.ndarray:
    """E[t] for the chosen tokens: the rows of the base weight (IR layout) as they are now."""
    return np.array(weight[list(lp.options["token_indices"])], dtype=np.float64)


register_external_source(ROWS_SOURCE, _current_rows)

LAYOUT = KindLayout(kind=KIND, build_layer=build_token_layer, prepare_spec=prepare_standalone)
