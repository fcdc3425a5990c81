"""Prefix and prompt tuning layouts: T learned virtual tokens, held as one shared table.

Prefix tuning: P ∈ R^{T×2·L·d} holds every layer's key and value prefix (d = token_dim). With
``prefix_projection`` (while training) P = tanh(E W₀ᵀ + b₀) W₂ᵀ + b₂ from E ∈ R^{T×d}; those five tensors
are the trainable state (named after PEFT's encoder: ``embedding.weight``, ``transform.0.*``,
``transform.2.*``) and only P is saved, as HF PEFT does; a reloaded adapter is the plain table.
Prompt tuning: P ∈ R^{T·S×d} (S = num_transformer_submodules) is prepended to the input embeddings.
Sizes the spec leaves null are filled from the model facts by HF PEFT's rules, grouped-query attention
included (prefix tuning: d = head_dim·n_kv and n_kv heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from peftdecl._json import JsonObject
from peftdecl.errors import PeftdeclError, TargetError
from peftdecl.init import register_shared_source
from peftdecl.plan.ir import Init, ModelInfo, ParamSpec, Plan, PromptPlan
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.kinds.lora import linear_default_init
from peftdecl.spec.prompt import PrefixTuningSpec, PromptTuningSpec

TABLE = "prompt_embeddings"
PROJECTION = (
    "embedding.weight",
    "transform.0.weight",
    "transform.0.bias",
    "transform.2.weight",
    "transform.2.bias",
)


def _fill(spec: PrefixTuningSpec | PromptTuningSpec, field: str, fact: str, info: ModelInfo) -> int:
    value = getattr(spec, field)
    if value is None:
        value = getattr(info, fact)
    if value is None:
        raise TargetError(
            f"$.{field} is null and the model facts give no {fact}: set {field} in the spec "
            f"or pass {fact}=... with the model"
        )
    return int(value)


def _virtual_tokens(spec: PrefixTuningSpec | PromptTuningSpec) -> int:
    # a spec without num_virtual_tokens is refused when it is checked (cross_field_problems), before compiling
    assert spec.num_virtual_tokens is not None, "num_virtual_tokens is required"
    return spec.num_virtual_tokens


def _sizes(spec: PrefixTuningSpec | PromptTuningSpec, info: ModelInfo, grouped_query: bool) -> dict[str, int]:
    """num_layers, token_dim, num_attention_heads, num_transformer_submodules as HF PEFT fills them."""
    sizes = {
        "num_layers": _fill(spec, "num_layers", "num_layers", info),
        "token_dim": _fill(spec, "token_dim", "hidden_size", info),
        "num_attention_heads": _fill(spec, "num_attention_heads", "num_attention_heads", info),
        "num_transformer_submodules": spec.num_transformer_submodules
        or (2 if spec.task_type == "SEQ_2_SEQ_LM" else 1),
    }
    if grouped_query and info.num_key_value_heads is not None:
        # PEFT sizes the prefix for the key/value heads, overriding token_dim and num_attention_heads
        head_dim = info.head_dim or sizes["token_dim"] // sizes["num_attention_heads"]
        sizes["token_dim"] = head_dim * info.num_key_value_heads
        sizes["num_attention_heads"] = info.num_key_value_heads
    return sizes


def build_prefix(spec: PrefixTuningSpec, info: ModelInfo) -> tuple[PromptPlan, tuple[ParamSpec, ...]]:
    """The KV table (or, while training with prefix_projection, the embedding and its MLP)."""
    sizes = _sizes(spec, info, grouped_query=True)
    t, d, layers = _virtual_tokens(spec), sizes["token_dim"], sizes["num_layers"]
    if d % sizes["num_attention_heads"]:
        raise TargetError(
            f"$.token_dim {d} is not a multiple of num_attention_heads {sizes['num_attention_heads']}"
        )
    width = 2 * layers * d
    zero = spec.init_weights == "zero"
    hidden = spec.encoder_hidden_size or d
    if spec.prefix_projection and not spec.inference_mode:
        params: tuple[ParamSpec, ...] = (
            ParamSpec("embedding.weight", (t, d), "trainable", Init("normal", std=1.0)),
            ParamSpec("transform.0.weight", (hidden, d), "trainable", linear_default_init(d)),
            ParamSpec("transform.0.bias", (hidden,), "trainable", _bias_init(d)),
            ParamSpec(
                "transform.2.weight",
                (width, hidden),
                "trainable",
                Init("zeros") if zero else linear_default_init(hidden),
            ),
            ParamSpec(
                "transform.2.bias", (width,), "trainable", Init("zeros") if zero else _bias_init(hidden)
            ),
        )
        projection: int | None = hidden
    else:
        params = (
            ParamSpec(TABLE, (t, width), "trainable", Init("zeros") if zero else Init("normal", std=1.0)),
        )
        projection = None
    plan = PromptPlan(
        "prefix_tuning",
        t,
        d,
        layers,
        sizes["num_attention_heads"],
        sizes["num_transformer_submodules"],
        projection_hidden=projection,
    )
    return plan, params


def build_prompt_tuning(spec: PromptTuningSpec, info: ModelInfo) -> tuple[PromptPlan, tuple[ParamSpec, ...]]:
    """The prompt table, drawn N(0, 1), from random vocabulary rows, or from the init text's token rows."""
    sizes = _sizes(spec, info, grouped_query=False)
    total = _virtual_tokens(spec) * sizes["num_transformer_submodules"]
    init = Init("normal", std=1.0)
    # PEFT skips SAMPLE_VOCAB/TEXT in inference mode (a loaded adapter's values come from its file)
    if spec.prompt_tuning_init != "RANDOM" and not spec.inference_mode:
        module = info.word_embeddings
        if module is None:
            raise TargetError(
                f"$.prompt_tuning_init {spec.prompt_tuning_init!r} copies rows of the input word embeddings, "
                "but the model facts name none: pass word_embeddings='<module>' with the model"
            )
        if spec.prompt_tuning_init == "SAMPLE_VOCAB":
            init = Init("external", source="prompt_sample_vocab", module=module)
        else:
            ids = repeat_to(text_token_ids(spec), total)
            init = Init("external", source="prompt_token_rows", module=module, ids=tuple(ids))
    plan = PromptPlan(
        "prompt_tuning",
        _virtual_tokens(spec),
        sizes["token_dim"],
        sizes["num_layers"],
        sizes["num_attention_heads"],
        sizes["num_transformer_submodules"],
    )
    return plan, (ParamSpec(TABLE, (total, sizes["token_dim"]), "trainable", init),)


def _bias_init(fan_in: int) -> Init:
    return Init("uniform", low=-1 / math.sqrt(fan_in), high=1 / math.sqrt(fan_in))


def repeat_to(ids: list[int], total: int) -> list[int]:
    """Truncate, or repeat ⌈total/len⌉ times and truncate, to exactly ``total`` ids."""
    if not ids:
        raise PeftdeclError("$.prompt_tuning_init_text tokenises to no tokens")
    return (ids * math.ceil(total / len(ids)))[:total]


def text_token_ids(spec: PromptTuningSpec) -> list[int]:
    """Token ids of ``prompt_tuning_init_text`` from ``AutoTokenizer.from_pretrained`` (transformers)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise PeftdeclError(
            "prompt_tuning_init 'TEXT' needs a tokenizer: install transformers (pip install transformers) "
            "or use prompt_tuning_init 'RANDOM' / 'SAMPLE_VOCAB'"
        ) from exc
    kwargs = dict(spec.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # as in PEFT: a config must not make us run remote code
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_name_or_path, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a bad path or folder
        raise PeftdeclError(
            f"$.tokenizer_name_or_path {spec.tokenizer_name_or_path!r} could not be loaded as a tokenizer: "
            f"{exc}"
        ) from exc
    return [int(i) for i in tokenizer(spec.prompt_tuning_init_text)["input_ids"]]


def _token_rows(
    base_weight_of: Callable[[str], np.ndarray], spec: ParamSpec, rng: np.random.Generator
) -> np.ndarray:
    table = base_weight_of(spec.init.arg("module"))
    ids = np.asarray(spec.init.arg("ids"), dtype=np.int64)
    bad = ids[(ids < 0) | (ids >= table.shape[0])]
    if bad.size:
        raise PeftdeclError(
            f"{spec.name}: the init text has token ids {sorted(set(bad.tolist()))[:5]} outside the "
            f"{table.shape[0]}-row word embedding {spec.init.arg('module')!r}"
        )
    return table[ids]


def _sample_vocab(
    base_weight_of: Callable[[str], np.ndarray], spec: ParamSpec, rng: np.random.Generator
) -> np.ndarray:
    table = base_weight_of(spec.init.arg("module"))
    return table[rng.integers(0, table.shape[0], size=spec.shape[0])]


register_shared_source("prompt_token_rows", _token_rows)
register_shared_source("prompt_sample_vocab", _sample_vocab)


def projected_prefix(params: Mapping[str, np.ndarray]) -> np.ndarray:
    """P = tanh(E W₀ᵀ + b₀) W₂ᵀ + b₂: the table a prefix_projection encoder produces."""
    hidden = np.tanh(params["embedding.weight"] @ params["transform.0.weight"].T + params["transform.0.bias"])
    table: np.ndarray = hidden @ params["transform.2.weight"].T + params["transform.2.bias"]
    return table


def _filled_config(plan: Plan) -> JsonObject:
    prompt = plan.prompt
    assert prompt is not None
    extra = {
        "token_dim": prompt.token_dim,
        "num_layers": prompt.num_layers,
        "num_attention_heads": prompt.num_attention_heads,
        "num_transformer_submodules": prompt.num_transformer_submodules,
    }
    if prompt.kind == "prefix_tuning":
        extra["encoder_hidden_size"] = plan.spec.encoder_hidden_size or prompt.token_dim  # type: ignore[attr-defined]
    return extra


def prefix_to_file(plan: Plan, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], JsonObject]:
    """Save the table (computed through the projection when training with one) and the filled sizes."""
    if TABLE not in arrays:
        arrays = {TABLE: projected_prefix({k: np.asarray(arrays[k], dtype=np.float64) for k in PROJECTION})}
    return arrays, _filled_config(plan)


def prompt_to_file(plan: Plan, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], JsonObject]:
    """Save the table and the sizes HF PEFT fills in."""
    return arrays, _filled_config(plan)


LAYOUTS = (
    KindLayout(
        kind="prefix_tuning",
        build_prompt=build_prefix,
        mergeable=False,
        to_file=prefix_to_file,
    ),
    KindLayout(
        kind="prompt_tuning",
        build_prompt=build_prompt_tuning,
        mergeable=False,
        to_file=prompt_to_file,
    ),
)
