"""Corrupted adapter folders for tests/test_fuzz_folders.py: valid templates, hypothesis strategies of
corruptions, applying them, running one entry point on one input with a hang deadline and per-input statistics.

Templates: HF PEFT, mlx-lm and native folders of LoRA (with and without an embedding), DoRA, AdaLoRA (a pruned
rank), OFT (on an embedding too), VeRA and prompt tuning, saved by peftdecl on a tiny NumPy Llama. Corruptions
(drawn in four groups about equally often): bytes of the tensor file or the JSON flipped, truncated, extended,
overwritten, the safetensors header length shifted; JSON values swapped for other types, huge, negative or NaN
numbers, keys dropped or added; tensors dropped, renamed, reshaped, rewritten in another dtype or with NaN/inf
(``safetensors.numpy``), metadata replaced; files deleted or replaced by folders; stale files of another format,
sub-adapters (complete or partial) and junk files added.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

import peftdecl
from peftdecl.demo import llama_state_dict

STATE = llama_state_dict(hidden=16, layers=2, heads=2, kv_heads=1, vocab=32, intermediate=24)
FACTS = {
    "layer_types": {"model.embed_tokens": "embedding"}, "output_head": "lm_head",
    "word_embeddings": "model.embed_tokens", "model_type": "llama", "num_layers": 2, "hidden_size": 16,
    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 32,
}  # fmt: skip
QV = ["q_proj", "v_proj"]
SPECS: dict[str, dict[str, Any]] = {
    "lora": {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": [*QV, "embed_tokens"],
             "init_lora_weights": False},
    "dora": {"peft_type": "LORA", "r": 2, "use_dora": True, "target_modules": QV},
    "adalora": {"peft_type": "ADALORA", "init_r": 3, "target_r": 2, "total_step": 10, "target_modules": QV,
                "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True]}},
    "oft": {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": ["q_proj", "embed_tokens"]},
    "vera": {"peft_type": "VERA", "r": 4, "target_modules": QV},
    "prompt": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "task_type": "CAUSAL_LM"},
}  # fmt: skip
SPECS["lora_linear"] = {**SPECS["lora"], "target_modules": QV}  # convertible: no embedding copy in HF files
MLX_SPECS = {"lora": SPECS["lora_linear"], "dora": SPECS["dora"]}
FILES = {
    "hf": ("adapter_config.json", "adapter_model.safetensors"),
    "native": ("peftdecl_adapter.json", "adapter.safetensors"),
    "mlx-lm": ("adapter_config.json", "adapters.safetensors"),
}
TEMPLATES = [(f, k) for f in ("hf", "native") for k in sorted(SPECS)] + [
    ("mlx-lm", k) for k in sorted(MLX_SPECS)
]
LORA_TEMPLATES = [("hf", "lora_linear"), ("mlx-lm", "lora")]


# -- templates -------------------------------------------------------------------------------------------------
_ROOT: Path | None = None


def template(file_format: str, kind: str) -> Path:
    """The valid folder of ``kind`` in ``file_format``, saved once per process."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="peftdecl-fuzz-templates-"))
        atexit.register(shutil.rmtree, _ROOT, True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for fmt, name in TEMPLATES:
                spec = (MLX_SPECS if fmt == "mlx-lm" else SPECS)[name]
                model = peftdecl.attach(STATE, spec, seed=0, **FACTS)
                model.save(_ROOT / fmt / name, format=fmt)
    return _ROOT / file_format / kind


# -- corruptions -----------------------------------------------------------------------------------------------
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 2**31, 2**63, 2**64, 10**4400, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        ["", ".", "..", "../x", "/etc", "all-linear", "LORA", "lora", "q_proj", "\x00", "\udcff"]
    ),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=5), st.none()), max_size=4),
    st.dictionaries(
        st.text(max_size=5), st.one_of(st.integers(-5, 5), st.none(), st.text(max_size=5)), max_size=3
    ),
)
DTYPES = ["float16", "float64", "int8", "int32", "int64", "uint8", "bool", "float32"]
RESHAPES = ["transpose", "flatten", "add_dim", "drop_row", "add_row", "drop_col", "scalar", "empty"]
VALUES = ["nan", "inf", "huge", "zero"]
ROLE = st.sampled_from(["config", "weights"])
FIELDS = [
    "peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "init_r",
    "target_r", "oft_block_size", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
    "layers_to_transform", "layers_pattern", "modules_to_save", "use_rslora", "save_projection",
    "projection_prng_key", "fine_tune_type", "num_layers", "lora_parameters", "rank", "scale", "keys", "format",
    "format_version", "spec", "task_type", "block_share", "module_dropout", "fan_in_fan_out",
]  # fmt: skip
INDEX = st.integers(0, 10**3)
# four groups drawn about equally often, so that the rarer structural corruptions are tried as much as bytes
BYTE_OPS = st.one_of(
    st.tuples(st.just("flip"), ROLE, st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), ROLE, st.integers(0, 10**6)),
    st.tuples(st.just("extend"), ROLE, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("overwrite"), ROLE, st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("header_len"), st.integers(-16, 16)),
)
JSON_OPS = st.one_of(
    st.tuples(st.just("json_set"), INDEX, JSON_VALUES),
    st.tuples(st.just("json_field"), st.sampled_from(FIELDS), JSON_VALUES),
    st.tuples(st.just("json_delete"), INDEX),
    st.tuples(st.just("json_add"), st.text(max_size=20), JSON_VALUES),
    st.tuples(st.just("json_replace"), JSON_VALUES),
)
TENSOR_OPS = st.one_of(
    st.tuples(st.just("tensor_drop"), INDEX),
    st.tuples(st.just("tensor_rename"), INDEX, st.text(max_size=40)),
    st.tuples(st.just("tensor_reshape"), INDEX, st.sampled_from(RESHAPES)),
    st.tuples(st.just("tensor_dtype"), INDEX, st.sampled_from(DTYPES)),
    st.tuples(st.just("tensor_values"), INDEX, st.sampled_from(VALUES)),
    st.tuples(st.just("tensor_add"), st.text(max_size=40), st.lists(st.integers(0, 5), max_size=3)),
    st.tuples(
        st.just("tensor_metadata"), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2)
    ),
)
FILE_OPS = st.one_of(
    st.tuples(st.just("delete"), ROLE),
    st.tuples(st.just("as_folder"), ROLE),
    st.tuples(st.just("stale"), st.sampled_from(TEMPLATES), st.sampled_from(["files", "sub", "partial_sub"])),
    st.tuples(
        st.just("junk"), st.sampled_from(["adapter_model.bin", "x.safetensors", ".tmp-save", "default"])
    ),
)
OPS = st.one_of(BYTE_OPS, JSON_OPS, TENSOR_OPS, FILE_OPS)


def _paths(folder: Path, file_format: str) -> dict[str, Path]:
    config, weights = FILES[file_format]
    return {"config": folder / config, "weights": folder / weights}


def _json_leaves(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (tuple of keys/indices) in a JSON document, containers included."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _json_leaves(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _json_leaves(value, (*prefix, index))


def _set(doc: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _load_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    except Exception:  # an earlier corruption made it unreadable: tensor operations are skipped
        return None


def _save_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    try:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata or None
        )
    except Exception:  # a name or value safetensors cannot write (lone surrogates): the operation is skipped
        return


def _reshaped(value: np.ndarray, how: str) -> np.ndarray:
    if how == "transpose":
        return value.T.copy()
    if how == "flatten":
        return value.reshape(-1)
    if how == "add_dim":
        return value[None]
    if how == "drop_row":
        return value[:-1] if value.ndim else value
    if how == "add_row":
        return np.concatenate([value, value[:1]]) if value.ndim else value
    if how == "drop_col":
        return value[..., :-1].copy() if value.ndim else value
    if how == "scalar":
        return np.asarray(value.reshape(-1)[:1].sum(), dtype=value.dtype)
    return np.zeros((0,) * max(value.ndim, 1), dtype=value.dtype)


def _values(value: np.ndarray, how: str) -> np.ndarray:
    out = value.astype(np.float32, copy=True)
    fill = {"nan": np.nan, "inf": np.inf, "huge": 3e38, "zero": 0.0}[how]
    out.reshape(-1)[:1] = fill
    return out


def apply(folder: Path, file_format: str, op: tuple) -> None:
    """Apply one corruption to ``folder`` (an operation that no longer applies is skipped)."""
    paths = _paths(folder, file_format)
    name = op[0]
    if name in ("flip", "truncate", "extend", "overwrite"):
        path = paths[op[1]]
        if not path.is_file():
            return
        data = bytearray(path.read_bytes())
        if name == "flip" and data:
            data[op[2] % len(data)] ^= op[3]
        elif name == "truncate":
            del data[op[2] % (len(data) + 1) :]
        elif name == "extend":
            data += op[2]
        elif name == "overwrite" and data:
            start = op[2] % len(data)
            data[start : start + len(op[3])] = op[3]
        path.write_bytes(bytes(data))
    elif name == "header_len":
        path = paths["weights"]
        if path.is_file() and path.stat().st_size >= 8:
            data = bytearray(path.read_bytes())
            length = int.from_bytes(data[:8], "little") + op[1]
            data[:8] = (length % 2**64).to_bytes(8, "little")
            path.write_bytes(bytes(data))
    elif name.startswith("json_"):
        path = paths["config"]
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except Exception:  # already corrupt or missing
            return
        if name == "json_replace":
            doc = op[1]
        elif name == "json_field":
            # the field where it lives: inside native's "spec", mlx-lm's "lora_parameters", or at the top
            holders = [doc] + [
                doc[k]
                for k in ("spec", "lora_parameters")
                if isinstance(doc, dict) and isinstance(doc.get(k), dict)
            ]
            holders = [h for h in holders if isinstance(h, dict)]
            if not holders:
                return
            holder = next((h for h in reversed(holders) if op[1] in h), holders[-1])
            holder[op[1]] = op[2]
        else:
            leaves = list(_json_leaves(doc))
            if name == "json_add":
                containers = [p for p in leaves if isinstance(_get(doc, p), dict)]
                target = _get(doc, containers[len(op[1]) % len(containers)]) if containers else None
                if target is None:
                    return
                target[op[1]] = op[2]
            else:
                path_ = leaves[op[1] % len(leaves)]
                if name == "json_delete":
                    if not path_:
                        return
                    doc = _set(doc, path_, None, delete=True)
                else:
                    doc = _set(doc, path_, op[2])
        limit = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(0)  # json writes the huge integers a reader must refuse
        try:
            text = json.dumps(doc)
        finally:
            sys.set_int_max_str_digits(limit)
        path.write_text(text, encoding="utf-8")
    elif name.startswith("tensor_"):
        path = paths["weights"]
        loaded = _load_tensors(path) if path.is_file() else None
        if loaded is None:
            return
        tensors, metadata = loaded
        keys = sorted(tensors)
        if name == "tensor_add":
            tensors[op[1]] = np.ones(op[2], dtype=np.float32)
        elif name == "tensor_metadata":
            metadata = op[1]
        elif keys:
            key = keys[op[1] % len(keys)]
            if name == "tensor_drop":
                del tensors[key]
            elif name == "tensor_rename":
                tensors[op[2]] = tensors.pop(key)
            elif name == "tensor_reshape":
                tensors[key] = _reshaped(tensors[key], op[2])
            elif name == "tensor_dtype":
                tensors[key] = tensors[key].astype(op[2])
            elif name == "tensor_values":
                tensors[key] = _values(tensors[key], op[2])
        _save_tensors(path, tensors, metadata)
    elif name == "delete":
        _remove(paths[op[1]])
    elif name == "as_folder":
        path = paths[op[1]]
        _remove(path)
        path.mkdir()
        (path / "inner").write_text("{}")
    elif name == "stale":
        source = template(*op[1])
        if op[2] == "files":
            for item in source.iterdir():
                if not (folder / item.name).exists():
                    shutil.copy(item, folder / item.name)
        else:
            sub = folder / "extra"
            if not sub.exists():
                shutil.copytree(source, sub)
                if op[2] == "partial_sub":
                    next(iter(sorted(sub.iterdir()))).unlink()
    elif name == "junk":
        target = folder / op[1]
        if not target.exists():
            target.write_bytes(b"\x80junk")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


# -- one input --------------------------------------------------------------------------------------------------------
def corrupted(file_format: str, kind: str, ops: list[tuple]) -> tuple[Path, Path]:
    """(work folder to delete afterwards, the corrupted adapter folder inside it)."""
    work = Path(tempfile.mkdtemp(prefix="peftdecl-fuzz-"))
    folder = work / "adapter"
    shutil.copytree(template(file_format, kind), folder)
    for op in ops:
        apply(folder, file_format, op)
    return work, folder
