"""mlx-lm's adapter files: ``adapters.safetensors`` + ``adapter_config.json``, as ``mlx_lm.lora`` writes them.

Layout (mlx_lm 0.32: tuner/lora.py, tuner/dora.py, tuner/utils.py): ``<module>.lora_a`` = Aᵀ [in, r] and
``<module>.lora_b`` = Bᵀ [r, out] (embeddings: [num_embeddings, r], [r, dim]), so Δy = scale · x lora_a lora_b with
an absolute ``scale`` (HF PEFT's lora_alpha / r, or / √r with rsLoRA); DoRA adds the magnitude ``<module>.m`` [out].
The config's ``fine_tune_type`` is lora | dora | full, ``num_layers`` selects the last N blocks of ``model.layers``
(N ≤ 0: all of them) and ``lora_parameters`` holds rank, scale, dropout and ``keys``: module names relative to a
block, applied in those blocks, or full names from the model root (mlx-lm matches both; no keys: every Linear and
Embedding of the blocks). Keys are mlx-lm module paths, which equal the transformers names for Llama-style models.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt

from peftdecl._json import JsonObject
from peftdecl.errors import AdapterFileError
from peftdecl.formats.atomic import adapter_folder, atomic_write_text, consistent_read, staged_directory
from peftdecl.formats.registry import AdapterFormat, Payload, read_config_text
from peftdecl.formats.safetensors_io import read_safetensors, write_safetensors
from peftdecl.plan.ir import LayerInfo, ModelInfo, Plan
from peftdecl.spec import SpecBase, load_spec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
DEFAULT_ADAPTER = "default"
LEAVES = ("lora_a", "lora_b", "m")
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embeddings")
"""Module names read as embeddings when a file is converted without a model (a file does not say)."""
MAX_RANK = 1 << 20
"""The largest rank read from a file (well above any real adapter; bounds what a corrupt config can ask for)."""
_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")


def is_mlx_lm_adapter_dir(folder: Path) -> bool:
    """True if ``folder`` holds mlx-lm adapter weights."""
    return (Path(folder) / WEIGHTS_NAME).is_file()


def _config(folder: Path) -> JsonObject:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"{folder}: {WEIGHTS_NAME} without {CONFIG_NAME}")
    text = read_config_text(path)
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise AdapterFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path}: expected a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind == "full":
        raise AdapterFileError(f"{path}: fine_tune_type 'full' stores whole weights, not an adapter")
    if kind not in ("lora", "dora"):
        raise AdapterFileError(f"{path}: fine_tune_type {kind!r} is not one of 'lora', 'dora'")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or not {"rank", "scale"} <= set(params):
        raise AdapterFileError(f"{path}: lora_parameters must be an object with 'rank' and 'scale'")
    _check_parameters(path, params)
    return config


def _check_parameters(path: Path, params: JsonObject) -> None:
    """Refuse a rank that is not a positive integer and a scale or dropout that is not a finite number
    (a NaN or infinite scale would make every output NaN)."""
    rank = params["rank"]
    if type(rank) is not int or not 1 <= rank <= MAX_RANK:
        raise AdapterFileError(
            f"{path}: lora_parameters.rank must be an integer from 1 to {MAX_RANK}, got {rank!r}"
        )
    for field in ("scale", "dropout"):
        value = params.get(field, 0.0)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise AdapterFileError(f"{path}: lora_parameters.{field} must be a finite number, got {value!r}")
    if not 0.0 <= params.get("dropout", 0.0) < 1.0:
        raise AdapterFileError(
            f"{path}: lora_parameters.dropout must be in [0, 1), got {params['dropout']!r}"
        )


def _modules(tensors: Mapping[str, np.ndarray], origin: Path) -> dict[str, dict[str, np.ndarray]]:
    by_module: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in LEAVES or not module:
            raise AdapterFileError(
                f"{origin}: tensor {key!r} is not an mlx-lm adapter tensor (.lora_a, .lora_b, .m)"
            )
        by_module.setdefault(module, {})[leaf] = value
    return by_module


def target_fields(modules: list[str]) -> dict[str, list[str] | list[int] | str]:
    """HF targeting fields selecting exactly ``modules``: block-relative names with ``layers_to_transform`` when
    the set is every listed name in every listed block of one ``layers`` list, else the full names."""
    found = [_BLOCK.match(m) for m in modules]
    prefixes = {f["prefix"] for f in found if f}
    if all(found) and len(prefixes) == 1:
        prefix = prefixes.pop()
        rests = sorted({f["rest"] for f in found if f})
        indices = sorted({int(f["index"]) for f in found if f})
        if len(modules) == len(rests) * len(indices) and prefix.rsplit(".", 1)[-1] == "layers":
            return {"target_modules": rests, "layers_to_transform": indices, "layers_pattern": "layers"}
    return {"target_modules": sorted(modules)}


@consistent_read
def read_adapter(folder: Path) -> tuple[SpecBase, dict[str, np.ndarray]]:
    """The HF-style LoRA spec and the tensors (mlx-lm keys) of an mlx-lm adapter folder."""
    folder = Path(folder)
    config = _config(folder)
    tensors, _ = read_safetensors(folder / WEIGHTS_NAME)
    if not tensors:
        raise AdapterFileError(f"{folder / WEIGHTS_NAME}: the file holds no tensors")
    params = config["lora_parameters"]
    rank, scale = params["rank"], float(params["scale"])
    dora = config.get("fine_tune_type", "lora") == "dora"
    by_module = _modules(tensors, folder / WEIGHTS_NAME)
    wanted = {"lora_a", "lora_b", "m"} if dora else {"lora_a", "lora_b"}
    for module, leaves in sorted(by_module.items()):
        if set(leaves) != wanted:
            raise AdapterFileError(
                f"{folder / WEIGHTS_NAME}: {module} has {sorted(leaves)}, expected {sorted(wanted)}"
            )
        if (
            leaves["lora_a"].ndim != 2
            or leaves["lora_b"].ndim != 2
            or leaves["lora_a"].shape[1] != rank
            or leaves["lora_b"].shape[0] != rank
        ):
            raise AdapterFileError(
                f"{folder / WEIGHTS_NAME}: {module}.lora_a {list(leaves['lora_a'].shape)} / lora_b "
                f"{list(leaves['lora_b'].shape)} do not have the configured rank {rank}"
            )
    alpha = scale * rank
    spec = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": float(params.get("dropout", 0.0)),
        "use_dora": dora,
        **target_fields(sorted(by_module)),
    }
    return load_spec(spec), tensors


def to_ir_arrays(
    plan: Plan, tensors: Mapping[str, np.ndarray], info: ModelInfo | None
) -> dict[str, np.ndarray]:
    """mlx-lm keys -> IR keys for a compiled LoRA/DoRA plan (transposing A and B)."""
    out: dict[str, np.ndarray] = {}
    for lp in plan.layers:
        m = lp.module
        if f"{m}.lora_a" not in tensors:
            raise AdapterFileError(f"{WEIGHTS_NAME}: no tensors for {m}, which the adapter's targets select")
        a, b = np.asarray(tensors[f"{m}.lora_a"]).T, np.asarray(tensors[f"{m}.lora_b"]).T
        if lp.layer.type == "embedding":
            if lp.kind == "dora":
                raise AdapterFileError(
                    f"{m}: mlx-lm's DoRA embedding normalises each vocabulary row (m has num_embeddings entries); "
                    "HF PEFT normalises each dimension, so the two cannot be converted"
                )
            if info is not None and info.output_head is None and m == info.word_embeddings:
                raise AdapterFileError(
                    f"{m}: in mlx-lm an embedding LoRA also changes the tied output head (as_linear); peftdecl "
                    "follows HF PEFT, where it does not, so this adapter would give different logits"
                )
            out[lp.key("lora_embedding_A")], out[lp.key("lora_embedding_B")] = a, b
            continue
        out[lp.key("lora_A.weight")], out[lp.key("lora_B.weight")] = a, b
        if lp.kind == "dora":
            out[lp.key("lora_magnitude_vector")] = np.asarray(tensors[f"{m}.m"])
    extra = sorted(set(tensors) - {f"{lp.module}.{leaf}" for lp in plan.layers for leaf in LEAVES})
    if extra:
        raise AdapterFileError(
            f"{WEIGHTS_NAME}: tensors {extra[:5]} belong to no layer the adapter's targets select"
        )
    return out


def mlx_lm_layout(plan: Plan, info: ModelInfo | None) -> JsonObject:
    """The ``adapter_config.json`` of a LoRA/DoRA plan, or an error listing everything mlx-lm cannot express."""
    problems = []
    if plan.kind not in ("lora", "dora") or plan.prompt is not None:
        problems.append(f"mlx-lm stores LoRA and DoRA only, not {plan.kind}")
    if plan.modules_to_save:
        problems.append(f"modules_to_save {list(plan.modules_to_save)} (mlx-lm has no whole-module copies)")
    if getattr(plan.spec, "layer_replication", None):
        problems.append("layer_replication (mlx-lm has no layer copies)")
    if not plan.layers and not problems:
        problems.append("the adapter adapts no layer")
    for lp in plan.layers:
        if lp.layer.type not in ("linear", "embedding"):
            problems.append(f"{lp.module} is a {lp.layer.type} layer (mlx-lm adapts Linear and Embedding)")
        if lp.options.get("lora_bias"):
            problems.append(f"{lp.module} has lora_bias (mlx-lm's LoRA has no bias)")
        if lp.kind == "dora" and lp.layer.type == "embedding":
            problems.append(
                f"{lp.module}: DoRA on an embedding (mlx-lm normalises per token, HF PEFT per dimension)"
            )
    for what, value in (("rank", lambda lp: lp.r), ("scale", lambda lp: lp.scaling)):
        seen: dict[float, list[str]] = {}
        for lp in plan.layers:
            seen.setdefault(value(lp), []).append(lp.module)
        if len(seen) > 1:
            listed = "; ".join(
                f"{v}: {', '.join(ms[:3])}{' ...' if len(ms) > 3 else ''}" for v, ms in seen.items()
            )
            problems.append(f"mlx-lm needs one {what} for every layer, this adapter has {listed}")
    if problems:
        raise AdapterFileError("cannot write an mlx-lm adapter: " + "; ".join(problems))
    first = plan.layers[0]
    keys, num_layers = _keys(plan.targets, None if info is None else info.num_layers)
    return {
        "fine_tune_type": plan.kind,
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": first.r,
            "scale": first.scaling,
            "dropout": float(first.options.get("dropout", 0.0)),
            "keys": keys,
        },
    }


def _keys(targets: tuple[str, ...], total_blocks: int | None) -> tuple[list[str], int]:
    # relative keys over the last N blocks when the targets are exactly that; full names always work otherwise,
    # since mlx-lm also matches keys against the model's full module names
    inside = {m: _BLOCK.match(m) for m in targets}
    blocks = {m: f for m, f in inside.items() if f and f["prefix"].rsplit(".", 1)[-1] == "layers"}
    outside = sorted(set(targets) - set(blocks))
    indices = sorted({int(f["index"]) for f in blocks.values()})
    rests = sorted({f["rest"] for f in blocks.values()})
    prefixes = {f["prefix"] for f in blocks.values()}
    if (
        total_blocks
        and blocks
        and len(prefixes) == 1
        and len(blocks) == len(indices) * len(rests)
        and indices == list(range(total_blocks - len(indices), total_blocks))
    ):
        return rests + outside, len(indices)
    return sorted(targets), total_blocks or (indices[-1] + 1 if indices else 0)


def to_mlx_lm_tensors(
    plan: Plan, arrays: Mapping[str, np.ndarray], dtype: npt.DTypeLike
) -> dict[str, np.ndarray]:
    """IR arrays -> mlx-lm keys (A and B transposed)."""
    out = {}
    for lp in plan.layers:
        m = lp.module
        if lp.layer.type == "embedding":
            a, b = arrays[lp.key("lora_embedding_A")], arrays[lp.key("lora_embedding_B")]
        else:
            a, b = arrays[lp.key("lora_A.weight")], arrays[lp.key("lora_B.weight")]
            if lp.kind == "dora":
                out[f"{m}.m"] = np.asarray(arrays[lp.key("lora_magnitude_vector")]).reshape(-1)
        out[f"{m}.lora_a"], out[f"{m}.lora_b"] = np.asarray(a).T, np.asarray(b).T
    return {k: np.ascontiguousarray(v).astype(dtype) for k, v in out.items()}


def write_adapters(
    directory: Path, payload: Payload, dtype: npt.DTypeLike = np.float32, info: ModelInfo | None = None
) -> None:
    """Save adapters in mlx-lm's layout (the default in ``directory``, others in sub-folders), all or nothing."""
    layouts = {name: mlx_lm_layout(plan, info) for name, (plan, _, _) in payload.items()}
    with staged_directory(Path(directory)) as stage:
        for name, (plan, arrays, _) in payload.items():
            folder = adapter_folder(stage, name)
            write_safetensors(
                folder / WEIGHTS_NAME, to_mlx_lm_tensors(plan, arrays, dtype), {"format": "mlx"}
            )
            atomic_write_text(folder / CONFIG_NAME, json.dumps(layouts[name], indent=4, sort_keys=True))


def lora_model_info(
    modules: Mapping[str, Mapping[str, tuple[int, ...]]], num_layers: int | None = None, origin: object = ""
) -> ModelInfo:
    """A model-free inventory of the layers a LoRA file touches, from its tensor shapes in the IR layout
    (``lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r], or ``lora_embedding_A`` [r, num] / ``_B`` [dim, r]);
    ``origin`` (the file) prefixes the error for a module whose A/B pair is incomplete or not two matrices."""
    layers = {}
    where = f"{origin}: " if origin else ""
    for module, shapes in modules.items():
        embedding = "lora_embedding_A" in shapes or "lora_embedding_B" in shapes
        pair = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if not any(p in shapes for p in pair):
            continue
        missing = [p for p in pair if p not in shapes]
        if missing:
            raise AdapterFileError(
                f"{where}{module} has no {missing[0]} (a LoRA layer needs both {' and '.join(pair)})"
            )
        a, b = shapes[pair[0]], shapes[pair[1]]
        if len(a) != 2 or len(b) != 2:
            raise AdapterFileError(
                f"{where}{module}: {pair[0]} {list(a)} and {pair[1]} {list(b)} must be matrices"
            )
        layers[module] = LayerInfo("embedding" if embedding else "linear", a[1], b[0])
    return ModelInfo(layers=layers, num_layers=num_layers)


def mlx_lm_model_info(tensors: Mapping[str, np.ndarray], num_layers: int | None = None) -> ModelInfo:
    """A model-free inventory of an mlx-lm file's layers; a module is an embedding when its name says so."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for module, leaves in _modules(tensors, Path(WEIGHTS_NAME)).items():
        a, b = leaves["lora_a"].shape, leaves["lora_b"].shape
        embedding = module.rsplit(".", 1)[-1] in EMBEDDING_NAMES
        shapes[module] = (
            {"lora_embedding_A": (a[1], a[0]), "lora_embedding_B": (b[1], b[0])}
            if embedding
            else {
                "lora_A.weight": (a[1], a[0]),
                "lora_B.weight": (b[1], b[0]),
            }
        )
    return lora_model_info(shapes, num_layers)


_LORA_SUFFIXES = (
    "lora_A.weight",
    "lora_B.weight",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
)


def convert_adapter(src: Path, dst: Path, to: str, num_layers: int | None = None) -> Plan:
    """Convert a LoRA/DoRA adapter folder between HF PEFT and mlx-lm without a model (``to``: "hf" | "mlx-lm").

    The layers are inferred from the tensor shapes; ``num_layers`` (the model's block count) lets an mlx-lm file
    name block-relative keys for the last N blocks instead of full module names."""
    from peftdecl.formats import hf_peft
    from peftdecl.formats.registry import detect_format, get_format
    from peftdecl.init import check_arrays
    from peftdecl.plan import compile_plan

    source, target = detect_format(Path(src)), get_format(to)
    spec, tensors = source.read(Path(src))
    if spec.kind not in ("lora", "dora"):
        raise AdapterFileError(f"{src}: convert handles LoRA and DoRA adapters, not {spec.peft_type}")
    if source.name == "mlx-lm":
        info = mlx_lm_model_info(tensors, num_layers)
    else:
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, value in tensors.items():
            ir = key.removeprefix(hf_peft.MODEL_PREFIX)
            suffix = next((s for s in _LORA_SUFFIXES if ir.endswith("." + s)), None)
            if suffix is None:
                raise AdapterFileError(
                    f"{src}: tensor {key!r} is not a LoRA tensor; convert handles LoRA and DoRA"
                )
            shapes.setdefault(ir[: -len(suffix) - 1], {})[suffix] = value.shape
        info = lora_model_info(shapes, num_layers, origin=Path(src) / source.weights_name)
    plan = compile_plan(spec, info)
    arrays = source.to_ir(plan, tensors, None)
    check_arrays(plan, arrays, origin=str(src))
    target.write(Path(dst), {DEFAULT_ADAPTER: (plan, arrays, None)}, np.float32, info)
    return plan


FORMAT = AdapterFormat(
    name="mlx-lm",
    detect=is_mlx_lm_adapter_dir,
    read=read_adapter,
    to_ir=to_ir_arrays,
    write=lambda directory, payload, dtype, info: write_adapters(directory, payload, dtype, info),
    weights_name=WEIGHTS_NAME,
)
"""This format's entry in :mod:`peftdecl.formats.registry`."""
