"""Read and check a training file: YAML or JSON (or an ``mlx_lm.lora`` config), ``--set`` overrides, its JSON
Schema, the cross-field rules and the adapter spec, all before any work starts.

Order: bounded read (the spec reader's limits) → plain JSON values → an ``mlx_lm.lora`` config mapped
(:mod:`.mlx_lm_config`) → ``--set`` overrides (:mod:`.overrides`) → unknown fields (with a "did you mean") and the
JSON Schema (``schemas/train.schema.json``, generated in memory) with JSON paths → msgspec decode → cross-field
rules → an inline adapter spec through :func:`peftdecl.load_spec`, its problems under ``$.adapter``. Every failure
is a :class:`~peftdecl.errors.TrainConfigError`. Relative paths in the file are relative to the current working
directory, as for ``mlx_lm.lora`` and transformers' ``Trainer``; :func:`check_paths` checks that they exist.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jsonschema
import msgspec

from peftdecl._json import JsonObject, JsonValue
from peftdecl.errors import SpecError, TrainConfigError
from peftdecl.formats.safetensors_io import read_safetensors_header
from peftdecl.spec import SpecBase
from peftdecl.spec.load import describe_error, json_path, whole_floats_to_ints
from peftdecl.train.config import TrainFile, train_schema
from peftdecl.train.mlx_lm_config import from_mlx_lm, is_mlx_lm_config
from peftdecl.train.overrides import EXPONENT_FLOAT, apply_overrides
from peftdecl.train.quantization import default_backend, quantization_problems, quantized_folder_problems

SPEC_SUFFIXES = (".json", ".yaml", ".yml")
_SCHEDULER_KWARGS = {
    "cosine": ("num_cycles",),
    "cosine_with_restarts": ("num_cycles",),
    "polynomial": ("power", "lr_end"),
}


def load_train_file(
    source: str | os.PathLike[str] | Mapping[str, JsonValue], overrides: Sequence[str] = ()
) -> TrainFile:
    """The checked training file from a path (YAML or JSON) or already-parsed data, with ``--set`` overrides.

    Raises TrainConfigError listing every problem found, each with its JSON path."""
    data, origin = read_train_data(source)
    try:
        if is_mlx_lm_config(data):
            model = data.get("model")
            data = from_mlx_lm(data, _model_config(model), block_linears(model))
        data = apply_overrides(_model_as_section(data, overrides), overrides)
        return train_file_from_dict(data)
    except TrainConfigError as exc:
        raise TrainConfigError(exc.problems, origin) from None


def read_train_data(
    source: str | os.PathLike[str] | Mapping[str, JsonValue],
) -> tuple[JsonObject, str | None]:
    """``(parsed mapping, origin)`` of a training file, read within the spec reader's bounds."""
    from peftdecl.spec._read import read_source
    from peftdecl.spec._values import plain_json

    origin = None if isinstance(source, Mapping) else os.fspath(source)
    try:
        if origin is not None and _is_dir(Path(origin)):
            raise TrainConfigError(
                [("$", "is a folder; a training file is a .yaml, .yml or .json file")], origin
            )
        data, origin = read_source(source if isinstance(source, Mapping) else Path(source))
        data = plain_json(data, origin)
    except TrainConfigError:
        raise
    except SpecError as exc:
        raise TrainConfigError(exc.problems, exc.source) from None
    if not isinstance(data, dict):
        kind = "nothing" if data is None else f"a {type(data).__name__}"
        raise TrainConfigError([("$", f"expected a mapping of training-file fields, got {kind}")], origin)
    return data, origin


def is_train_file(data: object) -> bool:
    """True when ``data`` is a training file or an ``mlx_lm.lora`` config rather than an adapter spec: a mapping
    with no ``peft_type`` that has ``model`` and ``data``, or is an mlx-lm config."""
    if not isinstance(data, Mapping) or "peft_type" in data:
        return False
    return ("model" in data and "data" in data) or is_mlx_lm_config(data)


def train_file_from_dict(data: Mapping[str, JsonValue]) -> TrainFile:
    """Check and decode an already-parsed (and mapped, overridden) training file."""
    schema = _schema()
    read: JsonObject = _exponent_floats(dict(data), schema)
    problems = _schema_problems(read)
    if isinstance(read.get("adapter"), dict):  # the adapter's own problems, alongside the file's
        problems += _inline_spec_problems(read["adapter"])
    if problems:
        raise TrainConfigError(problems)
    try:
        config = msgspec.convert(whole_floats_to_ints(read, schema), TrainFile)
    except msgspec.ValidationError as exc:  # the schema should have said it; a safety net with msgspec's path
        text, sep, where = str(exc).rpartition(" - at `")
        raise TrainConfigError([(where.rstrip("`"), text) if sep else ("$", str(exc))]) from None
    problems = rule_problems(config)
    if problems:
        raise TrainConfigError(problems)
    return config


def rule_problems(config: TrainFile) -> list[tuple[str, str]]:
    """Cross-field rules: warmup_steps ≤ max_steps; eval_steps and generation_check need held-out data; the
    scheduler's extra arguments are its own (transformers' names); ``model.quantization`` fits the backend
    (:func:`quantization_problems`). ``max_steps`` overrides ``num_train_epochs`` and ``warmup_steps`` overrides
    ``warmup_ratio``, as in transformers; neither pair is an error."""
    training = config.training
    found: list[tuple[str, str]] = []
    if config.quantization is not None:
        found += quantization_problems(config.quantization, config.backend or default_backend())
    if training.max_steps is not None and training.warmup_steps > training.max_steps:
        found.append(
            (
                "$.training.warmup_steps",
                f"{training.warmup_steps} warm-up steps is more than max_steps {training.max_steps}",
            )
        )
    if training.eval_steps is not None and config.data.valid is None:
        found.append(("$.training.eval_steps", "needs data.valid (the held-out examples evaluated)"))
    check = config.generation_check
    if check is not None and check.data is None and config.data.valid is None:
        found.append(
            ("$.generation_check", "needs generation_check.data or data.valid (prompt/completion file)")
        )
    allowed = _SCHEDULER_KWARGS.get(training.lr_scheduler_type, ())
    for name, value in training.lr_scheduler_kwargs.items():
        if name not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no extra arguments"
            found.append((f"$.training.lr_scheduler_kwargs.{name}", f"{training.lr_scheduler_type} {takes}"))
        elif name == "lr_end" and not 0.0 <= value < training.learning_rate:
            found.append(
                (
                    "$.training.lr_scheduler_kwargs.lr_end",
                    f"must be >= 0 and < learning_rate {training.learning_rate:g}, got {value:g}",
                )
            )
        elif name in ("num_cycles", "power") and not 0.0 < value <= 1.0e6:
            found.append((f"$.training.lr_scheduler_kwargs.{name}", f"must be > 0, got {value:g}"))
    if isinstance(config.adapter, str) and not _is_adapter_path(config.adapter):
        found.append(
            (
                "$.adapter",
                f"{config.adapter!r}: expected a spec file ({', '.join(SPEC_SUFFIXES)}) or an adapter folder",
            )
        )
    return found


def _model_as_section(data: JsonObject, overrides: Sequence[str]) -> JsonObject:
    """``model: PATH`` as ``model: {path: PATH}`` when an override sets a field inside it
    (``--set model.quantization.load_in_4bit=true``); otherwise ``data`` unchanged."""
    model = data.get("model")
    if isinstance(model, str) and any(o.partition("=")[0].strip().startswith("model.") for o in overrides):
        return {**data, "model": {"path": model}}
    return data


def resolve_adapter_spec(config: TrainFile) -> SpecBase:
    """The decoded adapter spec: the inline one, or the one in the spec file / adapter folder named."""
    from peftdecl.spec import load_spec

    try:
        if isinstance(config.adapter, str):
            return load_spec(Path(config.adapter))
        return load_spec(config.adapter)
    except SpecError as exc:
        raise TrainConfigError(_under_adapter(exc, config.adapter)) from None


def check_paths(config: TrainFile) -> None:
    """TrainConfigError naming each field whose path is missing: the model folder (with config.json), the adapter
    file or folder, data.train, data.valid and generation_check.data (relative to the working directory); and a
    quantised model folder that is incomplete, for the other backend, or given ``model.quantization`` again."""
    found: list[tuple[str, str]] = []
    where = "$.model" if isinstance(config.model, str) else "$.model.path"
    model = Path(config.model_path)
    if not _is_dir(model):
        found.append((where, f"model folder not found: {config.model_path}"))
    elif not _is_file(model / "config.json"):
        found.append((where, f"{config.model_path} holds no config.json (not an HF checkpoint folder)"))
    else:
        found += quantized_folder_problems(config)
    if isinstance(config.adapter, str):
        adapter = Path(config.adapter)
        if _is_dir(adapter) and not _is_file(adapter / "adapter_config.json"):
            found.append(("$.adapter", f"adapter folder {config.adapter} holds no adapter_config.json"))
        elif not _is_dir(adapter) and not _is_file(adapter):
            found.append(("$.adapter", f"adapter spec not found: {config.adapter}"))
    files = [("$.data.train", config.data.train), ("$.data.valid", config.data.valid)]
    if config.generation_check is not None:
        files.append(("$.generation_check.data", config.generation_check.data))
    for where, name in files:
        if name is not None and not _is_file(Path(name)):
            found.append((where, f"file not found: {name}"))
    if found:
        raise TrainConfigError(found)


@functools.cache
def _schema() -> JsonObject:
    return train_schema(published=False)


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_schema())


def _schema_problems(data: JsonObject) -> list[tuple[str, str]]:
    try:
        errors = sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    except RecursionError:  # plain_json bounds nesting, so this is a safety net
        return [("$", "nested too deeply to validate")]
    problems: dict[str, str] = {}
    for error in _within_branches(errors):
        path = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.schema, Mapping):
            known = list(error.schema.get("properties", {}))
            for key in error.instance if isinstance(error.instance, Mapping) else ():
                if key not in known:
                    problems.setdefault(json_path([*path, key]), f"unknown field{_did_you_mean(key, known)}")
            continue
        message = describe_error(error)
        if error.validator == "required" and isinstance(error.instance, Mapping):
            wanted = error.validator_value if isinstance(error.validator_value, list) else []
            for name in (n for n in wanted if n not in error.instance):
                problems.setdefault(json_path([*path, name]), "is required")
            continue
        problems.setdefault(json_path(path), message)
    return list(problems.items())


def _within_branches(errors: Sequence[jsonschema.ValidationError]) -> list[jsonschema.ValidationError]:
    """Errors with each ``anyOf`` replaced by the errors inside the one branch whose type the value has (a
    section that may be null, an integer that may be null), so that the path and the message are precise."""
    found: list[jsonschema.ValidationError] = []
    for error in errors:
        if error.validator == "anyOf" and error.context:
            branches: dict[object, list[jsonschema.ValidationError]] = {}
            for sub in error.context:
                branches.setdefault(sub.relative_schema_path[0], []).append(sub)
            here = list(error.absolute_path)
            fitting = [
                subs
                for subs in branches.values()
                if not any(
                    s.validator in ("type", "enum", "const") and list(s.absolute_path) == here for s in subs
                )
            ]
            if len(fitting) == 1:
                found += _within_branches(sorted(fitting[0], key=lambda e: [str(p) for p in e.absolute_path]))
                continue
        found.append(error)
    return found


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word[:100], choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _exponent_floats(value: JsonValue, schema: JsonValue) -> JsonValue:
    """``"1e-4"`` -> ``1e-4`` where ``schema`` wants a number: YAML 1.2 reads it as a float, PyYAML's YAML 1.1
    resolver as a string (users write learning rates this way, and mlx-lm's own loader reads them as floats)."""
    if not isinstance(schema, Mapping):
        return value
    if isinstance(value, str):
        kinds = {schema.get("type")} | {
            b.get("type") for b in schema.get("anyOf", ()) if isinstance(b, Mapping)
        }
        return float(value) if "number" in kinds and EXPONENT_FLOAT.fullmatch(value.strip()) else value
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if not isinstance(props, Mapping):
            for branch in schema.get("anyOf", ()):
                if isinstance(branch, Mapping) and branch.get("type") == "object":
                    return _exponent_floats(value, branch)
            props = {}
        return {k: _exponent_floats(v, props.get(k, extra)) for k, v in value.items()}
    return value


def _inline_spec_problems(spec: JsonObject) -> list[tuple[str, str]]:
    from peftdecl.spec import load_spec

    try:
        load_spec(spec)
    except SpecError as exc:
        return _under_adapter(exc, spec)
    return []


def _under_adapter(exc: SpecError, adapter: str | JsonObject) -> list[tuple[str, str]]:
    """An adapter spec's problems as training-file problems: an inline spec's paths go under ``$.adapter``; a spec
    file's problems are reported at ``$.adapter`` with the file and the path inside it."""
    if isinstance(adapter, str):
        where = exc.source or adapter
        return [("$.adapter", f"{where}: {path}: {message}") for path, message in exc.problems]
    return [("$.adapter" + path.removeprefix("$"), message) for path, message in exc.problems]


def _model_config(model: JsonValue) -> JsonObject | None:
    """The model folder's config.json (small, read only for mlx-lm's ``num_layers``), or None if unreadable."""
    if not isinstance(model, str) or not model:
        return None
    path = Path(model) / "config.json"
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


_BLOCK_WEIGHT = re.compile(r"(?:.*\.)?layers\.\d+\.(.+)\.weight")


def block_linears(model: JsonValue) -> list[str] | None:
    """Block-relative names of the linear layers in a model folder's blocks (``self_attn.q_proj``, ...): the
    matrices (2-D weights) under ``layers.N.``, read from the safetensors headers; None when unreadable."""
    if not isinstance(model, str) or not model or not _is_dir(Path(model)):
        return None
    names: set[str] = set()
    try:
        for path in sorted(Path(model).glob("*.safetensors")):
            for key, info in read_safetensors_header(path).items():
                found = _BLOCK_WEIGHT.fullmatch(key)
                if found and isinstance(info, dict) and len(info.get("shape", ())) == 2:
                    names.add(found.group(1))
    except (OSError, ValueError, RecursionError):
        return None
    return sorted(names) or None


def _is_adapter_path(text: str) -> bool:
    return text.lower().endswith(SPEC_SUFFIXES) or _is_dir(Path(text))


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False
