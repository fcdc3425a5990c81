"""``peftdecl combine RECIPE --out DIR``: run a merge recipe (:mod:`peftdecl.recipe`) and save the combined adapter
in HF PEFT's format.

The recipe is checked whole, its paths and ``--out`` looked at, then the base model is loaded, each adapter
attached and :func:`peftdecl.combine.add_weighted_adapter` called; only when all of that succeeded is anything
written, and then ``--out`` appears complete or not at all. A refusal names the recipe field (``$.svd_rank``,
``$.adapters[1].path``) and leaves no folder behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from peftdecl.errors import PeftdeclError

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel
    from peftdecl.recipe import Recipe

_OPTION_FIELDS = (
    "combination_type",
    "svd_rank",
    "svd_clamp",
    "density",
    "majority_sign_method",
    "adapter_name",
)
"""add_weighted_adapter's arguments that are recipe fields of the same name (its errors start with the name)."""


def add_combine_command(sub: argparse._SubParsersAction) -> None:
    """Register ``combine`` on the ``peftdecl`` parser."""
    combine = sub.add_parser(
        "combine", help="combine adapters by a merge recipe (add_weighted_adapter) into a new HF PEFT adapter"
    )
    combine.add_argument("recipe", type=Path, help="merge recipe (YAML or JSON)")
    combine.add_argument("--out", required=True, type=Path, help="new folder for the combined adapter")
    combine.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field by its dotted path, e.g. density=0.5 (value read as YAML)",
    )
    combine.add_argument("--backend", choices=("torch", "mlx"), default=None, help="overrides the recipe's")
    combine.set_defaults(run=_combine)


def _combine(args: argparse.Namespace) -> int:
    from peftdecl.merged_checkpoint import new_folder
    from peftdecl.recipe import RecipeError, check_recipe_paths, load_recipe

    recipe = load_recipe(args.recipe.absolute(), args.overrides)
    try:
        check_recipe_paths(recipe)
        _check_out(args.out)
        model = combined_model(recipe, args.backend)
    except RecipeError as exc:  # name the recipe file, as the reading errors do
        raise RecipeError(exc.problems, str(args.recipe.absolute())) from None
    with new_folder(args.out) as stage:
        model.save(stage, adapters=[recipe.adapter_name])
    rank = getattr(model.spec(recipe.adapter_name), "r", None)
    where = args.out if recipe.adapter_name == "default" else args.out / recipe.adapter_name
    detail = f"{recipe.combination_type}" + ("" if rank is None else f", rank {rank}")
    print(f"combined {len(recipe.adapters)} adapters ({detail}): {where}")
    return 0


def combined_model(recipe: Recipe, backend_name: str | None = None) -> AdaptedModel:
    """The recipe's base model with its adapters attached (as ``adapters[i]``) and the combination attached as
    ``recipe.adapter_name``; a refusal is a RecipeError naming the recipe field."""
    from peftdecl.backend import get_backend
    from peftdecl.model import AdaptedModel
    from peftdecl.recipe import RecipeError
    from peftdecl.train.runtime import TrainingBackend
    from peftdecl.train.setup import default_backend

    name = backend_name or recipe.backend or default_backend()
    backend = get_backend(name)
    if not isinstance(backend, TrainingBackend):
        raise RecipeError([("$.backend", f"backend {name!r} cannot load HF checkpoints")])
    base, _ = backend.load_pretrained(Path(recipe.model), device="cpu", dtype="float32")
    model = AdaptedModel.create(backend, base)
    names = [f"adapters[{i}]" for i in range(len(recipe.adapters))]
    kinds: list[str] = []
    for i, (adapter, name) in enumerate(zip(recipe.adapters, names, strict=True)):
        try:
            kinds.append(model.load_adapter(adapter.path, name).kind)
        except PeftdeclError as exc:
            raise RecipeError([(f"$.adapters[{i}].path", str(exc))]) from None
        if kinds[-1] != kinds[0]:
            message = (
                f"is {kinds[-1]} and $.adapters[0] is {kinds[0]}: adapters of different kinds do not combine"
            )
            raise RecipeError([(f"$.adapters[{i}].path", message)])
    seed_dare = getattr(backend, "seed_dare", None)
    if seed_dare is not None:  # torch: DARE draws from the global generator, as PEFT's does
        seed_dare(recipe.seed)
    try:
        model.add_weighted_adapter(
            names,
            [adapter.weight for adapter in recipe.adapters],
            recipe.adapter_name,
            combination_type=recipe.combination_type,
            svd_rank=recipe.svd_rank,
            svd_clamp=recipe.svd_clamp,
            svd_full_matrices=recipe.svd_full_matrices,
            density=recipe.density,
            majority_sign_method=recipe.majority_sign_method,
            seed=recipe.seed,
        )
    except PeftdeclError as exc:
        raise RecipeError([_recipe_problem(str(exc))]) from None
    return model


def _recipe_problem(message: str) -> tuple[str, str]:
    """add_weighted_adapter's message ``"<argument>: <why>"`` as the recipe's ``(json_path, why)``."""
    argument, sep, why = message.partition(": ")
    if sep and argument in _OPTION_FIELDS:
        return f"$.{argument}", why
    if sep and argument in ("adapters", "weights"):
        return "$.adapters", why
    return "$", message


def _check_out(out: Path) -> None:
    """``--out`` must be absent or an empty folder (checked before any work, and again when it is written)."""
    if out.is_file() or out.is_symlink():
        raise PeftdeclError(f"--out {out}: a file is in the way")
    if out.is_dir() and any(out.iterdir()):
        raise PeftdeclError(f"--out {out}: the folder exists and is not empty; combine into a new folder")
