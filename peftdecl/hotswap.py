"""Hot-swapping a LoRA adapter's weights in place (HF PEFT's ``utils/hotswap.py``), checked and padded in NumPy.

``hotswap_adapter`` writes a saved adapter's A and B into the tensors of an attached adapter, so every parameter
keeps its identity (a compiled model or an optimizer built before the swap keeps working). A layer of the
attached adapter that the new one does not target gets B = 0 (its update vanishes), as in PEFT.

``prepare_for_hotswap(target_rank=)`` pads A (rows) and B (columns) with zeros to ``target_rank``: ΔW = s·B A is
unchanged, and adapters of any rank ≤ target_rank then fit the same tensors. Where PEFT turns each layer's scaling
s into a tensor, peftdecl keeps the prepared scaling s₀ as a constant and writes B·(s/s₀) (and the B bias likewise):
s₀·(B s/s₀)·A = s·B A, so adapters of other alphas swap in without the compiled graph seeing a new constant.
The attached plan (and spec) stay the prepared ones, so ``save`` writes an adapter with the swapped-in function.
On torch the values are copied into the live tensors and on MLX new arrays take the old ones' slots (so
``torch.compile`` / ``mx.compile`` neither recompile nor retrace); the NumPy engine rebuilds the adapter's arrays
with the same plan (same keys and shapes, new array objects).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.formats import hf_peft
from peftdecl.formats.registry import detect_format, is_adapter_dir
from peftdecl.init import check_arrays
from peftdecl.names import check_adapter_name
from peftdecl.plan import Plan, compile_plan
from peftdecl.plan.compile import layouts
from peftdecl.plan.ir import LayerPlan
from peftdecl.spec import SpecBase
from peftdecl.spec.lora import LoraSpec

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel

CONFIG_KEYS_TO_AGREE = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")
"""PEFT's hot-swap check: configs differing in these cannot share one adapter's slots."""

_PREPARED: weakref.WeakKeyDictionary[AdaptedModel, dict[str, SpecBase]] = weakref.WeakKeyDictionary()
"""Model -> adapter name -> its spec before ``prepare_for_hotswap`` (the one new configs are checked against)."""

Arrays = dict[str, np.ndarray]


def _refuse(message: str) -> PeftdeclError:
    return PeftdeclError(f"hotswap: {message}")


def _check_swappable(model: AdaptedModel, name: str) -> Plan:
    if name not in model.adapters:
        raise _refuse(f"no adapter named {name!r} is attached (attached: {sorted(model.adapters)})")
    if name in model.merged_adapters:
        raise _refuse(f"adapter {name!r} is merged into the base weights; call unmerge() first")
    plan = model.plan(name)
    if plan.kind != "lora" or plan.modules_to_save or plan.shared or plan.prompt is not None:
        raise _refuse(
            f"adapter {name!r} is {plan.kind!r}; only plain LoRA adapters (no modules_to_save) swap"
        )
    return plan


def read_adapter(model: AdaptedModel, directory: str | Path, name: str) -> tuple[Plan, Arrays]:
    """A saved adapter (HF PEFT or peftdecl layout) compiled for ``model`` as ``name``, and its IR arrays."""
    folder = Path(directory)
    check_adapter_name(name)
    if name != hf_peft.DEFAULT_ADAPTER and is_adapter_dir(folder / name):
        folder = folder / name
    file_format = detect_format(folder)
    spec, tensors = file_format.read(folder)
    plan = compile_plan(spec, model.info, name)
    arrays = file_format.to_ir(plan, tensors, model.info)
    layout = layouts()[plan.kind]
    if layout.from_file is not None and not file_format.lossless:
        arrays = layout.from_file(plan, arrays)
    check_arrays(plan, arrays, origin=str(folder / file_format.weights_name))
    return plan, arrays


def check_configs_agree(old: SpecBase, new: SpecBase) -> None:
    """PEFT's rule: both are LoRA configs agreeing on use_rslora, lora_dropout, alpha_pattern and use_dora."""
    if not isinstance(new, LoraSpec) or not isinstance(old, LoraSpec):
        raise _refuse(f"only LoRA adapters swap; got {type(old).__name__} and {type(new).__name__}")
    for key in CONFIG_KEYS_TO_AGREE:
        if getattr(old, key) != getattr(new, key):
            raise _refuse(
                f"configs disagree on $.{key}: attached {getattr(old, key)!r}, new {getattr(new, key)!r}"
            )


def _is_b(param: str) -> bool:
    """B-side tensors carry the scaling ratio (lora_B.weight, lora_B.bias, lora_embedding_B)."""
    return param.startswith(("lora_B", "lora_embedding_B"))


def _pad(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` in the leading corner of a zero array of ``shape`` (rank axes padded with zeros)."""
    out = np.zeros(shape, dtype=np.float64)
    out[tuple(slice(0, n) for n in value.shape)] = value
    return out


def swapped_arrays(
    old: LayerPlan, new: LayerPlan | None, arrays: Mapping[str, np.ndarray], prepared: bool
) -> Arrays:
    """The values to write into layer ``old``'s tensors: ``new``'s A, and B·(s_new/s_old), padded to old's rank.

    ``new`` None: the new adapter leaves this layer alone, so B (and its bias) become 0 and ΔW = 0."""
    if new is None:
        return {p.name: np.zeros(p.shape) for p in old.params if _is_b(p.name)}
    if not prepared and (new.r != old.r or not math.isclose(new.scaling, old.scaling, rel_tol=1e-12)):
        raise _refuse(
            f"{old.module}: rank/scaling {new.r}/{new.scaling:g} differ from the attached {old.r}/{old.scaling:g}; "
            "call prepare_for_hotswap(target_rank=...) before swapping adapters of other ranks or alphas"
        )
    if new.r > old.r:
        raise _refuse(
            f"{old.module}: rank {new.r} exceeds the prepared rank {old.r}; prepare a larger target_rank"
        )
    if new.r != old.r and old.layer.groups > 1:
        raise _refuse(
            f"{old.module}: a grouped convolution (groups={old.layer.groups}) cannot take another rank"
        )
    ratio = new.scaling / old.scaling
    shapes = {p.name: p.shape for p in old.params}
    if set(shapes) != {p.name for p in new.params}:
        raise _refuse(
            f"{old.module}: tensors {sorted(shapes)} differ from {sorted(p.name for p in new.params)}"
        )
    out = {}
    for spec in new.params:
        value = np.asarray(arrays[new.key(spec.name)], dtype=np.float64)
        out[spec.name] = _pad(value * ratio if _is_b(spec.name) else value, shapes[spec.name])
    return out


def hotswap_adapter(model: AdaptedModel, directory: str | Path, adapter_name: str = "default") -> None:
    """Replace attached LoRA adapter ``adapter_name``'s weights in place by the adapter saved in ``directory``.

    Every check runs before the first write, so a refused swap leaves the model unchanged."""
    plan = _check_swappable(model, adapter_name)
    originals = _PREPARED.get(model, {})
    prepared = adapter_name in originals
    new_plan, arrays = read_adapter(model, directory, adapter_name)
    check_configs_agree(originals.get(adapter_name, plan.spec), new_plan.spec)
    if new_plan.kind != "lora" or new_plan.modules_to_save:
        raise _refuse(
            f"the new adapter is {new_plan.kind!r} (with modules_to_save {list(new_plan.modules_to_save)})"
        )
    extra = sorted(set(new_plan.targets) - set(plan.targets))
    if extra:
        raise _refuse(f"the new adapter targets layers the attached one does not: {extra}")
    new_layers = {lp.module: lp for lp in new_plan.layers}
    values = {
        lp.module: swapped_arrays(lp, new_layers.get(lp.module), arrays, prepared) for lp in plan.layers
    }
    write_in_place = getattr(model.backend, "write_adapter_in_place", None)
    if write_in_place is not None:  # torch, MLX: the live parameters (MLX: their slots) stay where they are
        write_in_place(model.engine, adapter_name, values)
        return
    # NumPy: the adapter's arrays are rebuilt with the same plan
    current = model.state_dict(adapter_name)
    for module, arrays in values.items():
        for tensor, value in arrays.items():
            key = f"{module}.{tensor}"
            current[key] = value.astype(current[key].dtype)
    _replace_adapter(model, adapter_name, plan, current)


def _padded_plan(plan: Plan, info_plan: Plan) -> Plan:
    """``info_plan`` (compiled at ``target_rank``) with each layer's scaling set to ``plan``'s exactly."""
    old = {lp.module: lp for lp in plan.layers}
    layers = []
    for lp in info_plan.layers:
        before = old[lp.module]
        if not math.isclose(lp.scaling, before.scaling, rel_tol=1e-9):
            raise _refuse(f"{lp.module}: padding changed the scaling {before.scaling:g} to {lp.scaling:g}")
        layers.append(dataclasses.replace(lp, scaling=before.scaling))
    return dataclasses.replace(info_plan, layers=tuple(layers))


def _padded_spec(spec: LoraSpec, plan: Plan, target_rank: int) -> LoraSpec:
    """``spec`` at rank ``target_rank`` with alphas keeping each layer's scaling (alpha = s·r, or s·√r)."""
    root = math.sqrt(target_rank) if spec.use_rslora else float(target_rank)
    alphas = {lp.module: lp.scaling * root for lp in plan.layers}
    first = next(iter(alphas.values()))
    if all(math.isclose(a, first, rel_tol=1e-12) for a in alphas.values()):
        return spec.replace(r=target_rank, rank_pattern={}, lora_alpha=first, alpha_pattern={})
    pattern = {f"^{module.replace('.', '[.]')}$": alpha for module, alpha in alphas.items()}
    return spec.replace(r=target_rank, rank_pattern={}, lora_alpha=first, alpha_pattern=pattern)


def prepare_for_hotswap(model: AdaptedModel, target_rank: int | None = None) -> None:
    """Pad every attached LoRA adapter to ``target_rank`` (zeros: ΔW unchanged) and mark it ready for swaps of
    other ranks and alphas; call it before ``torch.compile``. ``target_rank`` None keeps the ranks."""
    names = [n for n, p in model.adapters.items() if p.kind == "lora"]
    if not names:
        raise _refuse("no LoRA adapter is attached; load the first adapter before prepare_for_hotswap")
    for name in names:
        plan = _check_swappable(model, name)
        ranks = {lp.r for lp in plan.layers}
        if target_rank is not None and target_rank < max(ranks):
            raise _refuse(f"target_rank {target_rank} is below adapter {name!r}'s rank {max(ranks)}")
        if (
            target_rank is not None
            and any(lp.layer.groups > 1 for lp in plan.layers)
            and ranks != {target_rank}
        ):
            raise _refuse(f"adapter {name!r} adapts a grouped convolution, whose rank cannot be padded")
    originals = _PREPARED.setdefault(model, {})
    for name in names:
        plan = model.plan(name)
        originals.setdefault(name, plan.spec)
        if target_rank is None or {lp.r for lp in plan.layers} == {target_rank}:
            continue
        assert isinstance(plan.spec, LoraSpec)
        spec = _padded_spec(plan.spec, plan, target_rank)
        padded = _padded_plan(plan, compile_plan(spec, model.info, name))
        current = model.state_dict(name)
        values = {
            lp.key(p.name): _pad(current[lp.key(p.name)], p.shape) for lp in padded.layers for p in lp.params
        }
        _replace_adapter(model, name, padded, values)


def _replace_adapter(model: AdaptedModel, name: str, plan: Plan, values: Arrays) -> None:
    """Rebuild adapter ``name``'s tensors for ``plan`` (new parameter objects: call before compiling)."""
    check_arrays(plan, values, origin=f"adapter {name!r} padded")
    book = model._book  # the model's own record: this module acts on its behalf
    engine = model.engine
    engine.remove(name)
    book.plans[name] = plan
    engine.add(name, plan, values)
    engine.sync()
