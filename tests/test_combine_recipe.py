"""``peftdecl combine RECIPE --out DIR`` end to end on a tiny local Llama: LoRA adapters made by real PEFT, a merge
recipe, the combined adapter loaded back in PEFT against PEFT's own ``add_weighted_adapter``; the recipe's schema,
``peftdecl validate`` on recipes, and bad recipes refused with their JSON path and nothing written.

Tolerances are stated at each comparison (relative error of the logits, ‖a − b‖ / ‖b‖)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import rel_err, selected_backends

from peftdecl.cli import main
from peftdecl.train.tiny_model import build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
IDS = [[5, 6, 7, 8, 9, 10, 11, 12]]
ADAPTERS = {  # name: (r, lora_alpha, target_modules): different ranks, scales and targets
    "a": (4, 8, ["q_proj", "v_proj"]),
    "b": (8, 4, ["q_proj", "v_proj", "o_proj"]),
    "c": (4, 16, ["q_proj", "v_proj", "up_proj"]),
}


def needs_hf_backend(backend: str = "torch") -> None:
    """Skip unless ``backend`` (which loads HF checkpoints) is selected and real PEFT can check its output."""
    if backend not in selected_backends():
        pytest.skip(
            f"combine needs a backend that loads HF checkpoints; {backend} is not installed or selected"
        )
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny model ``tiny/`` (recipes live here and name it relatively)."""
    root = tmp_path_factory.mktemp("combine")
    build_tiny_llama(root / "tiny", hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)
    return root


@pytest.fixture(scope="module")
def peft_adapters(work: Path) -> Path:
    """LoRA adapters ``a``, ``b``, ``c`` (random A and B) saved by real PEFT under ``work``."""
    needs_hf_backend()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for seed, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_pretrained(work / "tiny"), config).save_pretrained(
            work / name
        )
    return work


def write_recipe(folder: Path, name: str = "recipe.yaml", **fields: Any) -> Path:
    """A recipe file (JSON text, which YAML reads too) in ``folder``; model and adapters relative to it."""
    recipe = {"model": "tiny", **fields}
    path = folder / name
    path.write_text(json.dumps(recipe, indent=2))
    return path


def entries(names: str, weights: list[float]) -> list[dict[str, Any]]:
    return [{"path": n, "weight": w} for n, w in zip(names, weights, strict=True)]


def peft_logits(work: Path, adapter: Path | None = None) -> np.ndarray:
    """Logits of the base model, or of PEFT's ``PeftModel.from_pretrained`` with ``adapter``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "tiny")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def peft_weighted_logits(
    work: Path, names: str, weights: list[float], seed: int | None = None, **options: Any
) -> np.ndarray:
    """Logits of PEFT's own ``add_weighted_adapter`` of the saved adapters ``names``. With ``seed`` (DARE), torch's
    generator is seeded right after PEFT initialises the new adapter's layers, just before its masks are drawn:
    the point where ``peftdecl combine`` seeds it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(work / "tiny"), work / names[0], names[0]
    )
    for name in names[1:]:
        model.load_adapter(work / name, adapter_name=name)
    if seed is not None:
        inject = model.base_model.inject_adapter

        def inject_then_seed(*args: Any, **kwargs: Any) -> None:
            inject(*args, **kwargs)
            torch.manual_seed(seed)

        model.base_model.inject_adapter = inject_then_seed
    model.add_weighted_adapter(list(names), weights, "combined", **options)
    model.set_adapter("combined")
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def peftdecl_logits(work: Path, adapter: Path) -> np.ndarray:
    """Logits of peftdecl's torch backend with the saved ``adapter`` loaded."""
    import torch
    from transformers import AutoModelForCausalLM

    import peftdecl

    model = peftdecl.load_adapter(AutoModelForCausalLM.from_pretrained(work / "tiny"), adapter)
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def combined_logits(recipe: Path) -> np.ndarray:
    """Logits of the recipe's combination in memory on peftdecl's torch backend (before any save)."""
    import torch

    from peftdecl.cli_combine import combined_model
    from peftdecl.recipe import load_recipe

    model = combined_model(load_recipe(recipe), "torch")
    model.set_adapter("default")
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


CASES = [  # (names, weights, options, tolerance of the logits against PEFT's own combination)
    # svd: PEFT takes the SVD of a float32 ΔW, peftdecl of a float64 one; the truncated factors differ by rounding
    ("abc", [0.7, 0.5, -0.3], {"combination_type": "svd"}, 1e-4),
    ("abc", [0.7, 0.5, -0.3], {"combination_type": "svd", "svd_rank": 6}, 1e-4),
    # svd_clamp's quantile depends on the signs the SVD routine gives the singular pairs: torch's float32 SVD, as
    # PEFT's, gives PEFT's signs (NumPy's float64 one clips differently here). svd_rank 4: every layer's ΔW has at
    # least 4 non-zero singular values; pairs beyond ΔW's rank are rounding noise on both sides and clip anyhow
    ("abc", [0.7, 0.5, -0.3], {"combination_type": "svd", "svd_clamp": 0.9, "svd_rank": 4}, 1e-4),
    # cat, linear, ties: the same float32 products summed in another order, then saved as float32
    ("abc", [1.0, -0.5, 0.8], {"combination_type": "cat"}, 1e-5),
    ("ac", [0.6, 0.9], {"combination_type": "linear"}, 1e-5),
    (
        "ac",
        [0.6, 0.9],
        {"combination_type": "ties", "density": 0.5, "majority_sign_method": "frequency"},
        1e-5,
    ),
    # DARE: PEFT's masks drawn from torch's generator seeded with the recipe's seed (float32, as above)
    ("ac", [0.6, 0.9], {"combination_type": "dare_linear", "density": 0.7, "seed": 3}, 1e-5),
    ("abc", [0.6, 0.9, 0.4], {"combination_type": "dare_ties_svd", "density": 0.5, "seed": 5}, 1e-4),
]


@pytest.mark.parametrize(("names", "weights", "options", "tolerance"), CASES)
def test_combined_adapter_loads_in_peft_as_peft_combines(
    peft_adapters: Path, tmp_path: Path, names: str, weights: list[float], options: dict, tolerance: float
) -> None:
    work = peft_adapters
    recipe = write_recipe(work, f"{tmp_path.name}.yaml", adapters=entries(names, weights), **options)
    out = tmp_path / "combined"
    assert main(["combine", str(recipe), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    seed = options.pop("seed", None)
    expected = peft_weighted_logits(work, names, weights, seed, **options)
    got = peft_logits(work, out)
    assert rel_err(got, expected) <= tolerance
    assert rel_err(expected, peft_logits(work)) > 1e-2  # the combination changes the model's output
    # peftdecl reads its own output as PEFT does (the same float32 file, the same products): 1e-6
    assert rel_err(peftdecl_logits(work, out), got) <= 1e-6
    # and the combination before it was saved (float32 parameters either way): 1e-6
    assert rel_err(combined_logits(recipe), got) <= 1e-6


def test_mlx_backend_combines_as_peft(peft_adapters: Path, tmp_path: Path) -> None:
    needs_hf_backend("mlx")
    work = peft_adapters
    weights = [0.7, 0.5, -0.3]
    recipe = write_recipe(work, "mlx.yaml", adapters=entries("abc", weights), backend="mlx")
    out = tmp_path / "combined"
    assert main(["combine", str(recipe), "--out", str(out)]) == 0
    # the SVD of MLX's float32 factors in float64 against PEFT's float32 SVD: rounding of float32, 1e-4
    assert rel_err(peft_logits(work, out), peft_weighted_logits(work, "abc", weights)) <= 1e-4


def test_named_adapter_goes_in_a_subfolder_and_set_overrides(
    peft_adapters: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = peft_adapters
    recipe = write_recipe(work, "named.yaml", adapters=entries("ab", [1.0, 1.0]), adapter_name="mix")
    out = tmp_path / "combined"
    assert main(["combine", str(recipe), "--out", str(out), "--set", "combination_type=cat"]) == 0
    assert [p.name for p in out.iterdir()] == ["mix"]
    config = json.loads((out / "mix" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4 + 8, 4 + 8)  # cat: Σ rᵢ, scale 1
    assert "cat, rank 12" in capsys.readouterr().out
    expected = peft_weighted_logits(work, "ab", [1.0, 1.0], combination_type="cat")
    assert rel_err(peft_logits(work, out / "mix"), expected) <= 1e-5  # float32, as the cat case above


# -- schema and validate ------------------------------------------------------------------------------------
def test_published_schema_is_current_and_lists_every_type() -> None:
    from peftdecl.combine import COMBINATION_TYPES
    from peftdecl.recipe import RECIPE_SCHEMA_FILE, recipe_schema

    published = json.loads((ROOT / "schemas" / RECIPE_SCHEMA_FILE).read_text(encoding="utf-8"))
    assert published == recipe_schema()
    assert set(published["properties"]["combination_type"]["enum"]) == set(COMBINATION_TYPES)


def test_example_recipe_is_valid() -> None:
    import jsonschema

    from peftdecl.recipe import load_recipe, recipe_schema
    from peftdecl.spec._yaml import load_yaml

    path = ROOT / "examples" / "combine.yaml"
    jsonschema.validate(load_yaml(path.read_text(), str(path)), recipe_schema())
    recipe = load_recipe(path)
    assert Path(recipe.model) == ROOT / "examples" / ".." / "runs" / "tiny-model"  # relative to the recipe


@pytest.fixture(scope="module")
def numpy_adapters(work: Path) -> Path:
    """Two LoRA folders saved by peftdecl's NumPy reference (enough for checks that load no model)."""
    from conftest import make_model

    for name in ("n1", "n2"):
        make_model().save(work / name)
    return work


def test_validate_recognises_a_recipe(numpy_adapters: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_recipe(numpy_adapters, "good.yaml", adapters=entries(["n1", "n2"], [0.5, 0.5]))
    bad = write_recipe(numpy_adapters, "bad.yaml", adapters=[{"path": "n1", "weight": 1}, {"path": "gone"}])
    assert main(["validate", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok (combine recipe, 2 adapters, svd)\n"
    assert main(["validate", str(bad)]) == 1
    assert capsys.readouterr().out == f"{bad}: $.adapters[1].weight: is required\n"


# -- bad recipes: the field's JSON path, nothing written -----------------------------------------------------
BEFORE_LOADING = [  # (recipe fields, path and words of the error); refused before any model is loaded
    ({"combination_type": "mean"}, "$.combination_type: expected one of"),
    ({"combination_type": "ties"}, "$.density: combination_type 'ties' needs a density"),
    ({"density": 0.5}, "$.density: combination_type 'svd' prunes nothing"),
    ({"combination_type": "cat", "svd_rank": 4}, "$.svd_rank: combination_type 'cat' takes no SVD"),
    ({"svd_rank": 0}, "$.svd_rank: expected an integer >= 1"),
    ({"combinaton_type": "svd"}, "$.combinaton_type: unknown field (did you mean 'combination_type'?)"),
    ({"adapter_name": "../x"}, "$.adapter_name: adapter name '../x': must be one path component"),
    ({"adapters": [{"path": "n1", "weight": 1}, {"path": "n2"}]}, "$.adapters[1].weight: is required"),
    (
        {"adapters": [{"path": "n1", "weight": 1}, {"path": "nowhere", "weight": 1}]},
        "$.adapters[1].path: adapter",
    ),
    ({"model": "nowhere"}, "$.model: model folder not found"),
    ({"adapters": []}, "$.adapters: "),
]


@pytest.mark.parametrize(("fields", "message"), BEFORE_LOADING)
def test_bad_recipe_is_refused_before_loading(
    numpy_adapters: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict, message: str
) -> None:
    recipe = write_recipe(
        numpy_adapters, "refused.yaml", **{"adapters": entries(["n1", "n2"], [1, 1]), **fields}
    )
    out = tmp_path / "out"
    assert main(["combine", str(recipe), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_non_empty_out_is_refused_and_kept(numpy_adapters: Path, tmp_path: Path) -> None:
    recipe = write_recipe(numpy_adapters, "out.yaml", adapters=entries(["n1", "n2"], [1, 1]))
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="not empty; combine into a new folder"):
        from peftdecl.cli_combine import _check_out

        _check_out(tmp_path)
    assert main(["combine", str(recipe), "--out", str(tmp_path)]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_refusals_after_loading(
    peft_adapters: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What only the loaded adapters show: another kind, ranks a type cannot mix, an SVD rank above a layer's."""
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    work = peft_adapters
    torch.manual_seed(0)
    ia3 = IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(work / "tiny"), ia3).save_pretrained(tmp_path / "ia3")
    cases = [
        (
            entries(["a", str(tmp_path / "ia3")], [1, 1]),
            {},
            "$.adapters[1].path: is ia3 and $.adapters[0] is lora",
        ),
        (
            entries("ab", [1, 1]),
            {"combination_type": "linear"},
            "$.adapters: combination_type 'linear' needs",
        ),
        # v_proj's ΔW is 16×32 (2 key-value heads of 8): rank 20 does not fit
        (
            entries("ab", [1, 1]),
            {"svd_rank": 20},
            "$.svd_rank: 20 exceeds what model.layers.0.self_attn.v_proj",
        ),
    ]
    for i, (adapters, options, message) in enumerate(cases):
        recipe = write_recipe(work, f"late{i}.yaml", adapters=adapters, **options)
        out = tmp_path / f"out{i}"
        assert main(["combine", str(recipe), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".out{i}")]


def test_ia3_adapters_combine_as_peft(work: Path, tmp_path: Path) -> None:
    """IA3: ℓ' = Σ wᵢ ℓᵢ over the union of the targets; PEFT's IA3 add_weighted_adapter takes no options."""
    needs_hf_backend()
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    for seed, targets in enumerate((["k_proj", "down_proj"], ["k_proj", "v_proj", "down_proj"])):
        torch.manual_seed(seed)
        config = IA3Config(target_modules=targets, feedforward_modules=["down_proj"], init_ia3_weights=False)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(work / "tiny"), config)
        model.save_pretrained(work / f"ia3_{seed}")
    weights = [0.8, -0.6]
    recipe = write_recipe(work, "ia3.yaml", adapters=entries(["ia3_0", "ia3_1"], weights))
    out = tmp_path / "combined"
    assert main(["combine", str(recipe), "--out", str(out)]) == 0
    expected = peft_weighted_logits(work, ["ia3_0", "ia3_1"], weights)
    assert rel_err(expected, peft_logits(work)) > 1e-2  # the combination changes the model's output
    assert rel_err(peft_logits(work, out), expected) <= 1e-5  # one float32 weighted sum per vector


def test_an_mlx_lm_folder_combines_like_its_hf_source(peft_adapters: Path, tmp_path: Path) -> None:
    """Adapter folders in any layout load_adapter reads: ``a`` converted to mlx-lm's files gives the same result."""
    work = peft_adapters
    assert (
        main(["convert", str(work / "a"), str(tmp_path / "a_mlx"), "--to", "mlx-lm", "--num-layers", "2"])
        == 0
    )
    adapters = [{"path": str(tmp_path / "a_mlx"), "weight": 0.7}, *entries("bc", [0.5, -0.3])]
    recipe = write_recipe(work, "mixed_formats.yaml", adapters=adapters, combination_type="cat")
    out = tmp_path / "combined"
    assert main(["combine", str(recipe), "--out", str(out)]) == 0
    expected = peft_weighted_logits(work, "abc", [0.7, 0.5, -0.3], combination_type="cat")
    assert rel_err(peft_logits(work, out), expected) <= 1e-5  # float32, as the cat case above
