"""Which layers an adapter wraps, reproducing HF PEFT's matching rules exactly.

- list ``target_modules``: a module matches if its name equals an entry or ends with ``"." + entry``;
- string ``target_modules``: a full-match regex; ``"all-linear"``: every linear layer but the output head (or, for
  ``task_type`` SEQ_CLS on a model without one, but its classification head);
- ``exclude_modules`` and ``modules_to_save`` are checked first and always win;
- ``layers_to_transform`` keeps suffix matches whose first numbered path segment (or the number after
  ``layers_pattern``) is listed; an exact-name match ignores it, as in PEFT.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import regex

from peftdecl.errors import TargetError
from peftdecl.plan.ir import ModelInfo
from peftdecl.spec import patterns
from peftdecl.spec._base import SpecBase

ALL_LINEAR = "all-linear"

_V = TypeVar("_V")

# HF PEFT's per-architecture defaults when target_modules is null (the common decoder/encoder families).
_QV = ("q_proj", "v_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _QV,
    "mistral": _QV,
    "mixtral": _QV,
    "qwen2": _QV,
    "qwen3": _QV,
    "gemma": _QV,
    "gemma2": _QV,
    "opt": _QV,
    "gpt2": ("c_attn",),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "t5": ("q", "v"),
}
"""LoRA, LoHa, LoKr, OFT, BOFT and VeRA share this table."""
SEQ_CLS_HEAD_NAMES = ("score", "classifier")
"""Attribute names HF PEFT tries, in order, for a sequence-classification model's head."""
TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
"""Entries HF PEFT's task wrappers (PeftModelForSequenceClassification, ...) append to ``modules_to_save``."""
ADALORA_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **{k: v for k, v in DEFAULT_TARGETS.items() if k not in ("mistral", "mixtral")},
    "roberta": ("query", "key", "value", "dense"),
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
IA3_DEFAULT_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # model type -> (targets, feed-forward targets)
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "t5": (("k", "v", "wo"), ("wo",)),
}


def default_targets(peft_type: str) -> dict[str, tuple[str, ...]]:
    """Model type -> default target_modules for one adapter kind."""
    if peft_type == "IA3":
        return {k: v[0] for k, v in IA3_DEFAULT_TARGETS.items()}
    return ADALORA_DEFAULT_TARGETS if peft_type == "ADALORA" else DEFAULT_TARGETS


def matches_list(key: str, names: Iterable[str]) -> bool:
    """PEFT's list rule: exact name or ``.``-suffix."""
    return any(key == name or key.endswith(f".{name}") for name in names)


def matches_selector(key: str, selector: str | Sequence[str], field: str = "exclude_modules") -> bool:
    """A string selector is a full-match regex (matched under a time limit), a list uses :func:`matches_list`."""
    if isinstance(selector, str):
        return patterns.fullmatch(selector, key, field)
    return matches_list(key, selector)


def is_module_to_save(key: str, modules_to_save: Sequence[str] | None) -> bool:
    """PEFT never targets a module inside or equal to a ``modules_to_save`` entry."""
    if not modules_to_save:
        return False
    return any(
        patterns.match(patterns.module_to_save_regex(m), key, "modules_to_save") for m in modules_to_save
    )


def layer_index(key: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The transformer-block index of a module name, or None."""
    found: re.Match[str] | regex.Match[str] | None
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        entries = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        found = None
        for entry in entries:
            found = patterns.match(patterns.layers_pattern_regex(entry), key, "layers_pattern")
            if found:
                break
    return int(found.group("idx")) if found else None


def resolve_target_modules(spec: SpecBase, info: ModelInfo) -> str | tuple[str, ...]:
    """The spec's ``target_modules`` with ``all-linear`` and null replaced as PEFT does before matching."""
    # every layer-targeting kind has the field; prompt learning never gets here
    targets: str | tuple[str, ...] | None = getattr(spec, "target_modules")  # noqa: B009
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        linear = [name for name, layer in info.layers.items() if layer.type in ("linear", "gpt2_conv1d")]
        head = info.output_head
        if head is None and spec.task_type == "SEQ_CLS":
            head = info.classifier_head
        return tuple(name for name in linear if name != head)
    if targets is None:
        table = default_targets(spec.peft_type)
        if info.model_type not in table:
            raise TargetError(
                f"target_modules is null and there is no default for model type {info.model_type!r}; "
                f"list the modules to adapt (known defaults: {', '.join(sorted(table))})"
            )
        return table[info.model_type]
    return targets


def task_modules_to_save(spec: SpecBase) -> tuple[str, ...] | None:
    """``spec.modules_to_save`` with the entries HF PEFT's wrapper for ``spec.task_type`` appends (SEQ_CLS and
    TOKEN_CLS: ``classifier``, ``score``; QUESTION_ANS: ``qa_outputs``), each at most once."""
    extra = TASK_MODULES_TO_SAVE.get(spec.task_type or "", ())
    own = tuple(spec.modules_to_save or ())
    if not extra:
        return spec.modules_to_save
    return own + tuple(m for m in extra if m not in own)


def is_targeted(key: str, spec: SpecBase, targets: str | Sequence[str]) -> bool:
    """PEFT's ``check_target_module_exists`` for one module name."""
    exclude = getattr(spec, "exclude_modules", None)
    if exclude and matches_selector(key, exclude):
        return False
    if is_module_to_save(key, spec.modules_to_save):
        return False
    if isinstance(targets, str):
        return patterns.fullmatch(targets, key, "target_modules")
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    wanted = getattr(spec, "layers_to_transform", None)
    if wanted is None or (isinstance(wanted, tuple) and not wanted):
        return True
    index = layer_index(key, getattr(spec, "layers_pattern", None))
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def select_targets(spec: SpecBase, info: ModelInfo) -> list[str]:
    """Names of the adaptable layers the spec wraps, in model order; errors if none or if a non-layer matches."""
    targets = resolve_target_modules(spec, info)
    chosen = [name for name in info.modules if is_targeted(name, spec, targets)]
    not_layers = [name for name in chosen if name not in info.layers]
    if not_layers:
        raise TargetError(
            f"target_modules selects {', '.join(not_layers[:5])}, which "
            f"{'is not a layer' if len(not_layers) == 1 else 'are not layers'} peftdecl can adapt "
            "(Linear, Embedding, Conv1d, Conv2d, Conv3d, GPT-2 Conv1D, and MultiheadAttention whose query, key "
            "and value share embed_dim)"
        )
    if not chosen:
        raise TargetError(_nothing_matched(spec, targets, info))
    return chosen


def _nothing_matched(spec: SpecBase, targets: str | Sequence[str], info: ModelInfo) -> str:
    wanted = [targets] if isinstance(targets, str) else list(targets)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in info.layers})
    close: list[str] = []
    for target in wanted:
        close += difflib.get_close_matches(target.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5)
    hint = f"; closest module names: {', '.join(dict.fromkeys(close))}" if close else ""
    sample = ", ".join(list(info.layers)[:6])
    return (
        f"target_modules {wanted} matched no layer of the model{hint} "
        f"(adaptable layers include: {sample}{', ...' if len(info.layers) > 6 else ''})"
    )


def pattern_value(
    table: Mapping[str, _V], module: str, default: _V, field: str = "rank_pattern/alpha_pattern"
) -> _V:
    """``rank_pattern``/``alpha_pattern`` lookup: the first key (in order) whose regex matches a suffix."""
    for key, value in table.items():
        if patterns.match(patterns.pattern_key_regex(key), module, f"{field} key"):
            return value
    return default
