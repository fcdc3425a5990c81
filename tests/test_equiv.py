"""The cross-backend equivalence harness (``peftdecl equiv``) on a tiny Llama checkpoint saved by transformers,
run on the NumPy reference, torch (transformers) and MLX (mlx-lm).

Its own tolerances are checked here: every adapted layer within 1e-5 of the float64 NumPy reference, logits
within 1e-4 across backends; a deliberately wrong backend (MLX or torch) must make it fail with a non-zero exit.
"""

from __future__ import annotations

import json

import pytest

import peftdecl
from peftdecl.cli import main
from peftdecl.equiv import LAYER_TOL, run_equivalence
from tests.hf_models import peft, peft_model, perturb, tiny_llama, transformers

pytest.importorskip("mlx.core")

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}
DORA = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "use_dora": True,
    "target_modules": ["k_proj", "down_proj"],
}

IA3 = {"peft_type": "IA3"}  # Llama's defaults: k_proj, v_proj and down_proj (feed-forward)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("spec", [LORA, DORA], ids=["lora", "dora"])
def test_cli_prints_a_passing_table(spec, checkpoint, tmp_path, capsys) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert main(["equiv", str(path), "--model", str(checkpoint), "--backends", "numpy,mlx"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("PASS")
    for layer in range(2):
        for module in spec["target_modules"]:
            if module != "embed_tokens":
                assert any(
                    line.startswith(f"model.layers.{layer}.") and module in line for line in out.splitlines()
                )


@pytest.mark.parametrize("spec", [LORA, DORA, IA3], ids=["lora", "dora", "ia3"])
def test_numpy_torch_and_mlx_agree_per_layer_and_on_logits(spec, checkpoint, capsys) -> None:
    pytest.importorskip("torch")
    argv = ["equiv", json.dumps(spec), "--model", str(checkpoint), "--backends", "numpy,torch,mlx"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1] == "PASS"
    assert lines[2].split() == ["module", "torch", "mlx"]
    modules = spec.get("target_modules") or ["k_proj", "v_proj", "down_proj"]
    layers = [line for line in lines[3:-2] if line.startswith("model.layers.")]
    assert len(layers) == 2 * len([m for m in modules if m != "embed_tokens"])
    for line in layers:  # both backends within 1e-5 of the float64 reference (the harness's layer tolerance)
        assert all(float(cell) <= LAYER_TOL for cell in line.split()[1:])
    assert lines[-2].split()[:2] == ["logits", "ref"]  # mlx compared with torch's logits


def test_a_wrong_torch_result_fails_the_harness(checkpoint, monkeypatch, capsys) -> None:
    pytest.importorskip("torch")
    from peftdecl_torch.layer import AdaptedLayer

    original = AdaptedLayer.forward
    monkeypatch.setattr(AdaptedLayer, "forward", lambda self, x: 1.001 * original(self, x))
    report = run_equivalence(LORA, model_dir=checkpoint, backend_names=["numpy", "torch", "mlx"])
    assert not report.passed
    layers = {row: errs for row, errs in report.rows.items() if row != "logits"}
    assert all(errs["torch"] > LAYER_TOL and errs["mlx"] <= LAYER_TOL for errs in layers.values())
    assert all(f.split("/")[1].startswith("torch") for f in report.failures())
    argv = ["equiv", json.dumps(LORA), "--model", str(checkpoint), "--backends", "numpy,torch,mlx"]
    assert main(argv) == 1
    assert "FAIL" in capsys.readouterr().out


def test_peft_saved_adapter_folder_and_every_installed_backend(checkpoint, tmp_path) -> None:
    wrapped = peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(checkpoint),
        peft.LoraConfig(
            r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"], init_lora_weights=False
        ),
    )
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    report = run_equivalence(tmp_path, model_dir=checkpoint)
    assert report.passed, report.format()
    assert "mlx" in report.backends
    assert len([r for r in report.rows if r != "logits"]) == 4
    for name, entry in peftdecl.backends().items():
        if entry.available and name != "numpy":
            assert name in report.backends or name in report.skipped  # skipped ones carry a reason
    if len(report.backends) > 1:
        assert "logits" in report.rows


def test_a_wrong_backend_fails_the_harness(checkpoint, monkeypatch, capsys) -> None:
    import peftdecl_mlx.kinds.lora as mlx_lora

    original = mlx_lora.LoraOps.delta
    monkeypatch.setattr(mlx_lora.LoraOps, "delta", lambda self, *a: 1.001 * original(self, *a))
    # a lone LoRA adapter on a linear layer runs its fused path; send it through the corrupted delta instead
    monkeypatch.setattr(mlx_lora.LoraOps, "alone", lambda self, *a: None)
    report = run_equivalence(LORA, model_dir=checkpoint, backend_names=["numpy", "mlx"])
    assert not report.passed
    assert all(e > LAYER_TOL for row, errs in report.rows.items() if row != "logits" for e in errs.values())
    assert main(["equiv", json.dumps(LORA), "--model", str(checkpoint), "--backends", "numpy,mlx"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_equiv_without_a_model_backend_is_an_error(checkpoint, capsys) -> None:
    assert main(["equiv", json.dumps(LORA), "--model", str(checkpoint), "--backends", "numpy"]) == 2
    assert "equiv needs at least one backend besides numpy" in capsys.readouterr().err


def _mlx_lm_model(kind: str):
    import importlib

    import mlx.core as mx

    shared = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=40)  # fmt: skip
    module, extra = {
        "llama": ("llama", {"model_type": "llama", "tie_word_embeddings": False}),
        "mistral": ("llama", {"model_type": "mistral", "tie_word_embeddings": False}),
        "qwen2": ("qwen2", {"model_type": "qwen2"}),
        "phi3": ("phi3", {"model_type": "phi3"}),
    }[kind]
    arch = importlib.import_module(f"mlx_lm.models.{module}")
    mx.random.seed(1)
    model = arch.Model(arch.ModelArgs(**shared, **extra))
    mx.eval(model.parameters())
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3"])
@pytest.mark.parametrize("kind", ["LORA", "DORA"])
def test_mlx_lm_architectures_match_the_reference_layer_by_layer(arch: str, kind: str) -> None:
    from peftdecl_mlx.inventory import numpy_model

    model = _mlx_lm_model(arch)
    state, _, facts = numpy_model(model)
    assert facts["model_type"] == arch and facts["num_layers"] == 2 and facts["num_key_value_heads"] == 2
    spec = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": "all-linear",
        "use_dora": kind == "DORA",
    }
    report = run_equivalence(spec, models={"mlx": model}, numpy_state=state, backend_names=["numpy", "mlx"])
    assert report.passed, report.format()
    per_block = {"phi3": 4, "qwen2": 7}.get(arch, 7)  # phi3 fuses qkv_proj and gate_up_proj
    assert len(report.rows) == 2 * per_block
