"""Corrupted adapter folders: every entry point ends in a result or a PeftdeclError, never another exception or
a hang.

Valid folders in all three formats (HF PEFT, mlx-lm, peftdecl native) of LoRA, DoRA, AdaLoRA (with a pruned
rank), OFT (on an embedding too), VeRA and prompt tuning are saved by peftdecl on a tiny NumPy Llama; hypothesis
corrupts a copy (bytes of the tensor file or the JSON flipped, truncated, extended; JSON values swapped for other
types, huge, negative or NaN numbers, keys dropped; tensors dropped, renamed, reshaped or rewritten in another
dtype with ``safetensors.numpy``; files deleted or replaced by folders; stale files of another format or another
adapter added) and then calls ``peftdecl.load_adapter`` (plus one forward per adapted layer),
``peftdecl.inspect.summarise``, ``peftdecl inspect`` and ``peftdecl convert`` (LoRA, mlx-lm <-> HF).

CI runs a bounded number of examples (tests/fuzz_settings.py); the long run is

    PEFTDECL_FUZZ_EXAMPLES=10000 PEFTDECL_FUZZ_STATS=/tmp/fuzz-stats \\
        .venv/bin/pytest -q -n 2 -p no:cacheprovider tests/test_fuzz_folders.py

where PEFTDECL_FUZZ_STATS (a folder) collects one JSON line per input: entry point, outcome, seconds, peak
traced memory and the process's peak RSS; ``python tests/test_fuzz_folders.py /tmp/fuzz-stats`` prints the totals
and each escaped exception with its smallest input. Add PEFTDECL_FUZZ_KEEP_GOING=1 to record escapes instead of
stopping at the first (the count the issue asks for), and PEFTDECL_FUZZ_DEADLINE_MS=60000 on a busy machine so
hypothesis' own deadline does not end the run; an input still running after PEFTDECL_FUZZ_HANG_S seconds
(default 20) is stopped and counted as a hang.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import peftdecl
from peftdecl.cli import main as cli_main
from peftdecl.demo import llama_state_dict
from peftdecl.errors import PeftdeclError
from peftdecl.formats.mlx_lm import convert_adapter
from peftdecl.inspect import summarise
from tests.fuzz_settings import fuzz_settings

HANG_S = float(os.environ.get("PEFTDECL_FUZZ_HANG_S", "20"))
"""An input still running after this many seconds is a hang (the test fails with FuzzHangError)."""
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


class FuzzHangError(Exception):
    """An input ran past HANG_S seconds."""


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


# -- running one input -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise FuzzHangError in this (main) thread if the block runs longer than ``seconds``."""

    def expired(signum: int, frame: Any) -> None:
        raise FuzzHangError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def corrupted(file_format: str, kind: str, ops: list[tuple]) -> tuple[Path, Path]:
    """(work folder to delete afterwards, the corrupted adapter folder inside it)."""
    work = Path(tempfile.mkdtemp(prefix="peftdecl-fuzz-"))
    folder = work / "adapter"
    shutil.copytree(template(file_format, kind), folder)
    for op in ops:
        apply(folder, file_format, op)
    return work, folder


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame inside peftdecl or its backends (else the innermost frame)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/peftdecl" in f.filename and "/tests/" not in f.filename]
    frame = (ours or frames or [None])[-1]
    return "?" if frame is None else f"{frame.filename.rsplit('/work/main/', 1)[-1]}:{frame.lineno}"


def run_entry(entry: str, case: tuple, call: Callable[[], Any]) -> None:
    """Run one entry point on one input: return on a result or a PeftdeclError; anything else propagates
    (with PEFTDECL_FUZZ_KEEP_GOING=1 and PEFTDECL_FUZZ_STATS set it is recorded instead, so a long run counts
    every escape rather than stopping at the first)."""
    stats = os.environ.get("PEFTDECL_FUZZ_STATS")
    keep_going = bool(stats) and os.environ.get("PEFTDECL_FUZZ_KEEP_GOING") == "1"
    if stats:
        tracemalloc.start()
    start = time.perf_counter()
    record: dict[str, Any] = {"entry": entry, "outcome": "result"}
    try:
        with deadline(HANG_S), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except PeftdeclError as exc:
        record["outcome"] = f"PeftdeclError:{type(exc).__name__}"
    except Exception as exc:
        record.update(outcome=f"OTHER:{type(exc).__name__}", where=_where(exc), message=str(exc)[:300])
        record["case"] = repr(case)[:2000]
        if not keep_going:
            raise
    finally:
        record["seconds"] = time.perf_counter() - start
        if stats:
            record["peak_bytes"] = tracemalloc.get_traced_memory()[1]
            record["max_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process's peak
            tracemalloc.stop()
            Path(stats).mkdir(parents=True, exist_ok=True)
            with open(Path(stats) / f"{entry}-{os.getpid()}.jsonl", "a") as out:
                out.write(json.dumps(record) + "\n")


def _load_and_forward(folder: Path) -> None:
    model = peftdecl.load_adapter(STATE, folder, **FACTS)
    model.eval()
    for lp in model.plan().layers:
        info = model.info.layers[lp.module]
        embedding = info.type == "embedding"
        x = np.arange(min(3, info.in_features)) if embedding else np.ones((2, info.in_features))
        model(lp.module, x)


def _cli(argv: list[str]) -> None:
    """The CLI exits 0 or 2 (a PeftdeclError, one line on stderr); 3 means an escaped exception: re-raised."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    lines = err.getvalue().splitlines()
    if code == 3:
        raise AssertionError(f"peftdecl {' '.join(argv)}: an exception escaped: {lines}")
    assert code in (0, 2), code
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        raise _CliError(lines[0])


class _CliError(PeftdeclError):
    """The CLI's clean one-line error, counted as a clean error."""


CASE = st.tuples(st.sampled_from(TEMPLATES), st.lists(OPS, min_size=1, max_size=3))
LORA_CASE = st.tuples(st.sampled_from(LORA_TEMPLATES), st.lists(OPS, min_size=1, max_size=3))


def _check(entry: str, case: tuple, call: Callable[[Path, Path], Any]) -> None:
    (file_format, kind), ops = case
    work, folder = corrupted(file_format, kind, ops)
    try:
        run_entry(entry, case, lambda: call(folder, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


@fuzz_settings()
@given(CASE)
def test_load_adapter(case: tuple) -> None:
    _check("load_adapter", case, lambda folder, work: _load_and_forward(folder))


@fuzz_settings()
@given(CASE)
def test_inspect_summarise(case: tuple) -> None:
    _check("summarise", case, lambda folder, work: summarise(folder))


@fuzz_settings()
@given(CASE)
def test_cli_inspect(case: tuple) -> None:
    _check("cli_inspect", case, lambda folder, work: _cli(["inspect", str(folder)]))


@fuzz_settings()
@given(LORA_CASE)
def test_convert(case: tuple) -> None:
    to = "mlx-lm" if case[0][0] == "hf" else "hf"
    _check("convert", case, lambda folder, work: convert_adapter(folder, work / "out", to))


@fuzz_settings()
@given(LORA_CASE)
def test_cli_convert(case: tuple) -> None:
    to = "mlx-lm" if case[0][0] == "hf" else "hf"
    _check(
        "cli_convert",
        case,
        lambda folder, work: _cli(["convert", str(folder), str(work / "out"), "--to", to]),
    )


@pytest.mark.parametrize(("file_format", "kind"), TEMPLATES)
def test_templates_load(file_format: str, kind: str, tmp_path) -> None:
    """The uncorrupted folders load and inspect (otherwise every fuzzed input would be a trivial error)."""
    _load_and_forward(template(file_format, kind))
    assert summarise(template(file_format, kind)).format == file_format
    if (file_format, kind) in LORA_TEMPLATES:
        convert_adapter(
            template(file_format, kind), tmp_path / "out", "mlx-lm" if file_format == "hf" else "hf"
        )


FOUND = {
    # AdaLoRA's re-expansion of a pruned lora_B with a row missing: a NumPy broadcast ValueError before
    "adalora_pruned_b_short": (("hf", "adalora"), [("tensor_reshape", 1, "drop_row")]),
    # a 1-D VeRA projection: IndexError in the projection cut before
    "vera_flat_projection": (("hf", "vera"), [("tensor_reshape", 8, "flatten")]),
    "vera_scalar_projection": (("hf", "vera"), [("tensor_reshape", 8, "scalar")]),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_inputs_the_fuzzer_found(name: str) -> None:
    (file_format, kind), ops = FOUND[name]
    work, folder = corrupted(file_format, kind, ops)
    try:
        with pytest.raises(PeftdeclError, match="has shape"):
            _load_and_forward(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _base_copy_key(file_format: str, kind: str) -> int:
    """Index (in sorted order) of the saved copy of the adapted embedding, model.embed_tokens.base_layer.weight."""
    loaded = _load_tensors(template(file_format, kind) / FILES[file_format][1])
    assert loaded is not None
    return next(i for i, k in enumerate(sorted(loaded[0])) if k.endswith("embed_tokens.base_layer.weight"))


@pytest.mark.parametrize(("file_format", "kind"), [("hf", "lora"), ("native", "lora"), ("hf", "oft")])
@pytest.mark.parametrize("how", ["transpose", "flatten", "scalar"])
def test_a_wrong_shaped_embedding_copy_is_refused(file_format: str, kind: str, how: str) -> None:
    """The embedding copy PEFT saves beside an adapted embedding replaces the base weight on load: a wrong
    shape must be refused there, not fail in the first forward (found by the fuzzer; loading is
    peftdecl/model.py's base-override path)."""
    ops = [("tensor_reshape", _base_copy_key(file_format, kind), how)]
    work, folder = corrupted(file_format, kind, ops)
    try:
        with pytest.raises(PeftdeclError):
            _load_and_forward(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("dropped", ["lora_B.weight", "lora_embedding_B"])
def test_convert_of_a_lora_missing_b_is_refused(dropped: str) -> None:
    """An HF LoRA file with a module's B tensor missing (found by the fuzzer; the model-free inventory is built in
    peftdecl/formats/mlx_lm.py)."""
    kind = "lora" if dropped == "lora_embedding_B" else "lora_linear"
    loaded = _load_tensors(template("hf", kind) / FILES["hf"][1])
    assert loaded is not None
    keys = sorted(loaded[0])
    ops = [
        ("tensor_drop", keys.index(k)) for k in reversed(keys) if k.endswith((dropped, "base_layer.weight"))
    ]
    work, folder = corrupted("hf", kind, ops)
    try:
        with pytest.raises(PeftdeclError):
            convert_adapter(folder, work / "out", "mlx-lm")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("file_format", ["hf", "native", "mlx-lm"])
@pytest.mark.parametrize("how", ["nan", "inf"])
def test_a_non_finite_tensor_is_refused_by_name(file_format: str, how: str) -> None:
    work, folder = corrupted(file_format, "lora", [("tensor_values", 1, how)])
    try:
        with pytest.raises(PeftdeclError, match="NaN or infinite"):
            peftdecl.load_adapter(STATE, folder, **FACTS)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("dtype", ["int64", "bool", "complex64"])
def test_arrays_of_a_non_float_dtype_are_refused_by_name(dtype: str) -> None:
    model = peftdecl.attach(STATE, SPECS["lora"], **FACTS)
    arrays = {k: v.astype(dtype) for k, v in model.state_dict().items()}
    with pytest.raises(
        PeftdeclError, match=rf"tensor \S+ has dtype {dtype}, expected a floating-point dtype"
    ):
        model.add_adapter("b", SPECS["lora"], arrays=arrays)


def summary(folder: str) -> str:
    """Totals of a PEFTDECL_FUZZ_STATS folder: inputs, clean errors, others, worst seconds and peak memory."""
    rows: dict[str, list[dict]] = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            rows.setdefault(record["entry"], []).append(record)
    lines = [
        f"{'entry':<14} {'inputs':>7} {'results':>8} {'clean':>7} {'other':>6} {'hangs':>6} {'worst s':>8} "
        f"{'traced MiB':>10} {'max RSS MiB':>11}"
    ]
    for entry, records in sorted(rows.items()):
        clean = sum(r["outcome"].startswith("PeftdeclError") for r in records)
        other = sum(r["outcome"].startswith("OTHER") for r in records)
        results = sum(r["outcome"] == "result" for r in records)
        worst = max(r["seconds"] for r in records)
        hangs = sum(r["outcome"] == "OTHER:FuzzHangError" for r in records)
        peak = max(r["peak_bytes"] for r in records) / 2**20
        rss = max(r.get("max_rss_kib", 0) for r in records) / 2**10
        lines.append(
            f"{entry:<14} {len(records):>7} {results:>8} {clean:>7} {other:>6} {hangs:>6} {worst:>8.3f} "
            f"{peak:>10.1f} {rss:>11.0f}"
        )
    escapes: dict[tuple[str, str], list[dict]] = {}
    for records in rows.values():
        for r in records:
            if r["outcome"].startswith("OTHER"):
                escapes.setdefault((r["outcome"], r.get("where", "?")), []).append(r)
    for (outcome, where), found in sorted(escapes.items(), key=lambda item: -len(item[1])):
        smallest = min(found, key=lambda r: len(r.get("case", "")))
        lines.append(f"{len(found):>6} {outcome} at {where}: {smallest.get('message', '')[:120]}")
        lines.append(f"       e.g. {smallest.get('case')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1]) if len(sys.argv) > 1 else __doc__)
