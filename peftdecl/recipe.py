"""Merge recipes: a YAML or JSON file naming a base model, adapter folders with one weight each, and HF PEFT's
``add_weighted_adapter`` method and options; ``peftdecl combine`` (:mod:`peftdecl.cli_combine`) runs one.

Reading follows the training file's order: bounded read → ``--set`` overrides → unknown fields (with a "did you
mean") and the JSON Schema (``schemas/combine.schema.json``, generated from :class:`Recipe`) with JSON paths →
msgspec decode → cross-field rules → relative paths resolved against the recipe file's folder. Every failure is
a :class:`RecipeError` whose problems are ``(json_path, message)`` pairs such as ``$.adapters[1].weight``.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import msgspec
from msgspec import Meta, Struct

from peftdecl._json import JsonObject, JsonValue
from peftdecl.combine import COMBINATION_TYPES, DENSITY_TYPES, SVD_TYPES
from peftdecl.errors import PeftdeclError, SpecError
from peftdecl.names import check_adapter_name
from peftdecl.spec.load import describe_error, json_path, whole_floats_to_ints

RECIPE_SCHEMA_FILE = "combine.schema.json"
MAX_ADAPTERS = 4096
"""Adapters in one recipe at most (each is loaded into memory before the combination)."""

CombinationType = Literal[
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]


class RecipeError(SpecError):
    """A merge recipe is invalid, or what it names cannot be combined; ``problems`` holds ``(json_path,
    message)`` pairs."""


class _Section(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Base of every recipe section: unknown fields are errors."""


class RecipeAdapter(_Section):
    """One adapter to combine and its weight wᵢ in Σ wᵢ ΔWᵢ."""

    path: Annotated[
        str,
        Meta(
            min_length=1,
            description="Adapter folder (HF PEFT, mlx-lm or peftdecl native); relative to the recipe's folder.",
        ),
    ]
    weight: Annotated[float, Meta(description="Its weight wᵢ (negative subtracts the adapter).")]


class Recipe(_Section):
    """A ``peftdecl combine`` recipe: a base model, adapters with weights, and HF PEFT's ``add_weighted_adapter``
    method and options (PEFT's names and defaults)."""

    model: Annotated[
        str,
        Meta(
            min_length=1,
            description="Base model: a local HF checkpoint folder; relative to the recipe's folder.",
        ),
    ]
    adapters: Annotated[
        list[RecipeAdapter],
        Meta(
            min_length=1,
            max_length=MAX_ADAPTERS,
            description="The adapters to combine, each with its weight.",
        ),
    ]
    combination_type: Annotated[
        CombinationType, Meta(description="PEFT's combination method (svd: the truncated SVD of Σ wᵢ ΔWᵢ).")
    ] = "svd"
    svd_rank: Annotated[
        Annotated[int, Meta(ge=1, le=65536)] | None,
        Meta(description="*_svd types: rank kept; null: the largest rank of the adapters."),
    ] = None
    svd_clamp: Annotated[
        Annotated[float, Meta(ge=0.0, le=1.0)] | None,
        Meta(description="*_svd types: clamp the factors' entries to this quantile; null: no clamping."),
    ] = None
    svd_full_matrices: Annotated[
        bool, Meta(description="*_svd types: full (true) or reduced SVD; the kept factors are the same.")
    ] = True
    density: Annotated[
        Annotated[float, Meta(ge=0.0, le=1.0)] | None,
        Meta(description="ties, dare_*, magnitude_prune (and their _svd): fraction of entries kept."),
    ] = None
    majority_sign_method: Annotated[
        Literal["total", "frequency"], Meta(description="ties types: how the elected sign is chosen.")
    ] = "total"
    seed: Annotated[
        int,
        Meta(
            ge=0,
            le=2**63 - 1,
            description="dare_* types: seeds the random masks: on torch, torch's global generator just before the "
            "masks (drawn in PEFT's order); elsewhere a NumPy generator.",
        ),
    ] = 0
    adapter_name: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=255,
            description="Name of the combined adapter; other than default it is saved in OUT/<adapter_name>.",
        ),
    ] = "default"
    backend: Annotated[
        Literal["torch", "mlx"] | None, Meta(description="Default: mlx on Apple silicon, otherwise torch.")
    ] = None


def recipe_schema() -> JsonObject:
    """The recipe's JSON Schema (``schemas/combine.schema.json``), generated from :class:`Recipe`."""
    from peftdecl.schema import SCHEMA_BASE_URL, SCHEMA_DIALECT, harden

    generated = msgspec.json.schema(Recipe)
    defs: JsonObject = generated["$defs"]
    body = defs.pop("Recipe")
    body["title"] = "peftdecl combine recipe"
    body["description"] = " ".join((Recipe.__doc__ or "").split()).replace("``", "`")
    hardened: JsonObject = harden({**body, "$defs": defs})
    return {"$schema": SCHEMA_DIALECT, "$id": SCHEMA_BASE_URL + RECIPE_SCHEMA_FILE, **hardened}


def is_recipe(data: object) -> bool:
    """True when parsed ``data`` is a merge recipe: a mapping with ``model`` and ``adapters`` and neither
    ``peft_type`` (an adapter spec) nor ``data`` (a training file)."""
    return (
        isinstance(data, Mapping)
        and {"model", "adapters"} <= set(data)
        and not {"peft_type", "data"} & set(data)
    )


def load_recipe(
    source: str | os.PathLike[str] | Mapping[str, JsonValue], overrides: Sequence[str] = ()
) -> Recipe:
    """The checked recipe from a file (YAML or JSON) or parsed data, with ``--set KEY=VALUE`` overrides; its
    relative paths resolved against the file's folder (the working directory for parsed data). Paths are not
    looked at here (:func:`check_recipe_paths`). Raises RecipeError listing every problem with its JSON path."""
    from peftdecl.train.overrides import apply_overrides

    origin = None if isinstance(source, Mapping) else os.fspath(source)
    try:
        data = apply_overrides(_read(source), overrides)
    except SpecError as exc:
        raise RecipeError(exc.problems, exc.source or origin) from None
    problems = _schema_problems(data)
    if problems:
        raise RecipeError(problems, origin)
    recipe = msgspec.convert(whole_floats_to_ints(data, _schema()), Recipe)
    problems = rule_problems(recipe)
    if problems:
        raise RecipeError(problems, origin)
    folder = Path(origin).parent if origin is not None else Path.cwd()
    adapters = [msgspec.structs.replace(a, path=_resolved(folder, a.path)) for a in recipe.adapters]
    return msgspec.structs.replace(recipe, model=_resolved(folder, recipe.model), adapters=adapters)


def rule_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Cross-field rules: a density where the type prunes (and none where it does not), the SVD options only with
    an SVD type, an adapter name that can name a folder."""
    found: list[tuple[str, str]] = []
    kind = recipe.combination_type
    if kind in DENSITY_TYPES and recipe.density is None:
        found.append(
            ("$.density", f"combination_type {kind!r} needs a density (the fraction of entries kept)")
        )
    elif kind not in DENSITY_TYPES and recipe.density is not None:
        found.append(
            ("$.density", f"combination_type {kind!r} prunes nothing; only {_listed(DENSITY_TYPES)} use it")
        )
    for name in ("svd_rank", "svd_clamp"):
        if getattr(recipe, name) is not None and kind not in SVD_TYPES:
            found.append(
                (f"$.{name}", f"combination_type {kind!r} takes no SVD; only {_listed(SVD_TYPES)} use it")
            )
    try:
        check_adapter_name(recipe.adapter_name)
    except PeftdeclError as exc:
        found.append(("$.adapter_name", str(exc)))
    return found


def check_recipe_paths(recipe: Recipe) -> None:
    """RecipeError naming each missing path: the model folder (with config.json) and each adapter folder (one
    peftdecl can read: HF PEFT, mlx-lm or native)."""
    from peftdecl.formats.registry import is_adapter_dir

    found: list[tuple[str, str]] = []
    model = Path(recipe.model)
    if not _safe(model.is_dir):
        found.append(("$.model", f"model folder not found: {recipe.model}"))
    elif not _safe((model / "config.json").is_file):
        found.append(("$.model", f"{recipe.model} holds no config.json (not an HF checkpoint folder)"))
    for i, adapter in enumerate(recipe.adapters):
        folder = Path(adapter.path)
        if not _safe(folder.is_dir):
            found.append((f"$.adapters[{i}].path", f"adapter folder not found: {adapter.path}"))
            continue
        try:
            readable = is_adapter_dir(folder)
        except PeftdeclError:
            readable = False
        if not readable:
            found.append((f"$.adapters[{i}].path", f"{adapter.path} holds no adapter peftdecl can read"))
    if found:
        raise RecipeError(found)


def recipe_summary(path: str | os.PathLike[str]) -> str:
    """``peftdecl validate``'s description of a valid recipe (file and paths checked)."""
    recipe = load_recipe(path)
    check_recipe_paths(recipe)
    return f"combine recipe, {len(recipe.adapters)} adapters, {recipe.combination_type}"


def _read(source: str | os.PathLike[str] | Mapping[str, JsonValue]) -> JsonObject:
    """The parsed recipe mapping, read within the spec reader's bounds (size, depth, YAML tags)."""
    from peftdecl.spec._read import read_source
    from peftdecl.spec._values import plain_json

    if not isinstance(source, Mapping) and _safe(Path(source).is_dir):
        raise SpecError([("$", "is a folder; a recipe is a .yaml, .yml or .json file")], os.fspath(source))
    data, origin = read_source(source if isinstance(source, Mapping) else Path(source))
    data = plain_json(data, origin)
    if not isinstance(data, dict):
        kind = "nothing" if data is None else f"a {type(data).__name__}"
        raise SpecError([("$", f"expected a mapping of recipe fields, got {kind}")], origin)
    return data


@functools.cache
def _schema() -> JsonObject:
    return recipe_schema()


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_schema())


def _schema_problems(data: JsonObject) -> list[tuple[str, str]]:
    """One problem per field: unknown fields (with a suggestion), missing ones, then the schema's first
    complaint about each value."""
    try:
        errors = sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    except RecursionError:  # the reader bounds nesting, so this is a safety net
        return [("$", "nested too deeply to validate")]
    problems: dict[str, str] = {}
    for error in errors:
        path: list[Any] = list(error.absolute_path)
        if error.validator in ("additionalProperties", "required") and isinstance(error.instance, Mapping):
            schema = error.schema if isinstance(error.schema, Mapping) else {}
            known = list(schema.get("properties", {}))
            if error.validator == "additionalProperties":
                for key in (k for k in error.instance if k not in known):
                    problems.setdefault(json_path([*path, key]), f"unknown field{_did_you_mean(key, known)}")
            else:
                for name in (n for n in error.validator_value if n not in error.instance):
                    problems.setdefault(json_path([*path, name]), "is required")
            continue
        problems.setdefault(json_path(path), describe_error(error))
    return list(problems.items())


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(word)[:100], choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names)


def _resolved(folder: Path, path: str) -> str:
    return str(folder / path) if not Path(path).is_absolute() else path


def _safe(check: Any) -> bool:
    """``check()`` (a ``Path.is_dir`` or ``is_file``), False where the OS cannot even look the path up."""
    try:
        return bool(check())
    except (OSError, ValueError):
        return False


__all__ = [
    "COMBINATION_TYPES",
    "RECIPE_SCHEMA_FILE",
    "Recipe",
    "RecipeAdapter",
    "RecipeError",
    "check_recipe_paths",
    "is_recipe",
    "load_recipe",
    "recipe_schema",
    "recipe_summary",
]
