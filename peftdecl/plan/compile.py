"""``compile_plan``: spec + model inventory -> Plan. Pure and fast (no arrays are touched)."""

from __future__ import annotations

from peftdecl.errors import PeftdeclError, TargetError
from peftdecl.kinds import get_kind, kinds
from peftdecl.plan.ir import ModelInfo, Plan
from peftdecl.plan.kinds import KindLayout, registry
from peftdecl.plan.kinds.lora_mha import check_inside_attention
from peftdecl.plan.param_targets import module_targets, parameter_layers
from peftdecl.plan.targeting import TASK_MODULES_TO_SAVE, task_modules_to_save
from peftdecl.plan.weight_tying import tie_specs, with_token_layers
from peftdecl.spec import SpecBase
from peftdecl.spec.limits import ADAPTER_BYTES_ENV, max_adapter_bytes


def layouts() -> dict[str, KindLayout]:
    """Execution kind -> layout, from the kind registry (cached until a kind is registered or removed)."""
    return registry()


def compile_plan(
    spec: SpecBase, info: ModelInfo, name: str | None = None, *, max_bytes: int | None = None
) -> Plan:
    """Resolve targets, ranks, scalings and tensor layouts of ``spec`` on the model described by ``info``.

    As HF PEFT's task wrappers do, ``task_type`` SEQ_CLS / TOKEN_CLS / QUESTION_ANS first add the task's head
    names to ``modules_to_save`` (the plan's spec carries them, so a saved config lists them as PEFT's does).
    A plan whose float64 reference copy would exceed ``max_bytes`` (default :func:`max_adapter_bytes`, set by
    ``PEFTDECL_MAX_ADAPTER_BYTES``) is refused here, before any array exists; ``name`` names it in the error."""
    plan = _compile(spec, info)
    check_size(plan, name, max_bytes)
    return plan


def estimated_bytes(plan: Plan) -> int:
    """Bytes of the adapter's float64 reference copy: parameter count × 8."""
    return plan.num_parameters() * 8


def check_size(plan: Plan, name: str | None = None, max_bytes: int | None = None) -> None:
    """Raise a PeftdeclError if :func:`estimated_bytes` of ``plan`` exceeds ``max_bytes``."""
    limit = max_adapter_bytes() if max_bytes is None else max_bytes
    size = estimated_bytes(plan)
    if size > limit:
        who = f"adapter {name!r}" if name is not None else "the adapter"
        raise PeftdeclError(
            f"{who} ({plan.spec.peft_type}, {len(plan.layers)} layers) would hold {plan.num_parameters():,} "
            f"parameters, {size / 2**30:.3g} GiB as float64 ({size:,} bytes), over the limit of {limit:,} bytes; "
            f"lower the rank or target fewer modules, or raise {ADAPTER_BYTES_ENV}"
        )


def _compile(spec: SpecBase, info: ModelInfo) -> Plan:
    saved = task_modules_to_save(spec)
    if saved != spec.modules_to_save:
        spec = spec.replace(modules_to_save=saved)
    kind = spec.kind
    layout = layouts().get(kind)
    if layout is None:
        raise TargetError(
            f"adapter kind {kind!r} ({spec.peft_type}) has no execution layout in this peftdecl"
        )
    if layout.prepare_spec is not None:
        spec = layout.prepare_spec(spec, info)
    spec = tie_specs(spec, info)  # ensure_weight_tying: heads tied to the embeddings' copy or LoRA
    modules_to_save = _modules_to_save(spec, info)
    if layout.build_prompt is not None:
        prompt, shared = layout.build_prompt(spec, info)
        return Plan(
            spec=spec, kind=kind, layers=(), shared=shared, modules_to_save=modules_to_save, prompt=prompt
        )
    assert layout.build_layer is not None
    layer_types = accepted_layer_types(kind)
    layers = []
    for name in module_targets(spec, info):
        layer = info.layers[name]
        if layer.type not in layer_types:
            raise TargetError(
                f"{name} ({layer.type}) cannot be adapted: {spec.peft_type} supports "
                f"{', '.join(layer_types)} layers only"
                + (f" as {kind}" if kind != spec.peft_type.lower() else "")
            )
        layers.append(layout.build_layer(spec, name, layer, info))
    # target_parameters: raw parameters (HF PEFT's ParamWrapper)
    layers += parameter_layers(spec, info, layers)
    check_inside_attention(layers)
    shared = layout.build_shared(spec, layers, info) if layout.build_shared else ()
    layers = with_token_layers(spec, info, layers)  # trainable tokens: extra and tied token layers
    return Plan(spec=spec, kind=kind, layers=tuple(layers), shared=shared, modules_to_save=modules_to_save)


def accepted_layer_types(kind: str) -> tuple[str, ...]:
    """The layer types a spec of ``kind`` may target: its own, and those of the kinds ``reached_from`` it."""
    extra = (t for decl in kinds().values() if decl.reached_from == kind for t in decl.layer_types)
    return (*get_kind(kind).layer_types, *extra)


def _modules_to_save(spec: SpecBase, info: ModelInfo) -> tuple[str, ...]:
    wanted = spec.modules_to_save
    if not wanted:
        return ()
    # PEFT wraps every module whose name ends with an entry (a raw string suffix test, over-matching included);
    # only the outermost match is kept, since a wrapped module's children are inside its copy.
    found = [name for name in info.modules if any(name.endswith(entry) for entry in wanted)]
    outer = tuple(n for n in found if not any(n != o and n.startswith(o + ".") for o in found))
    # a task's own head names may match nothing (PEFT adds both "classifier" and "score"); the user's must match
    if not outer and set(wanted) - set(TASK_MODULES_TO_SAVE.get(spec.task_type or "", ())):
        raise TargetError(f"modules_to_save {list(wanted)} matched no module of the model")
    return outer
