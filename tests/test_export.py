"""``peftdecl export``: merged safetensors, merged ONNX (checked with onnxruntime) and llama.cpp GGUF adapters.

Expected values come from HF PEFT (its merged model and logits, its saved A/B tensors and scalings) and from an
index-by-index restatement of llama.cpp's q/k row order written here; tolerances sit beside each comparison."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from train_runs import needs

from peftdecl.cli import main
from peftdecl.train.tiny_model import build_tiny_llama

HEADS, KV_HEADS, LAYERS = 4, 2, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42, 43, 44, 45, 46]]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("export") / "base", hidden=32, heads=HEADS, kv_heads=KV_HEADS,
                            layers=LAYERS, intermediate=48)  # fmt: skip


def peft_adapter(base: Path, out: Path, **config: object):  # type: ignore[no-untyped-def]
    """Save a PEFT LoRA (random B, seeded) on ``base``; return the live PEFT model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **config}
    peft_model = get_peft_model(lm, LoraConfig(**options)).eval()  # type: ignore[arg-type]
    peft_model.save_pretrained(out)
    return peft_model


def logits(model, ids: list[list[int]]) -> np.ndarray:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


def export(*args: object) -> int:
    return main(["export", *(str(a) for a in args)])


def refused(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    """The one-line error of an export that must fail (exit status 2)."""
    capsys.readouterr()
    assert export(*args) == 2
    return capsys.readouterr().err


# -- safetensors ---------------------------------------------------------------------------------------------
def test_safetensors_equals_merge_command_and_peft(base: Path, tmp_path: Path) -> None:
    needs("torch")
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    peft_model = peft_adapter(base, tmp_path / "adapter")
    expected = logits(peft_model.merge_and_unload(), IDS)
    exported, merged = tmp_path / "exported", tmp_path / "merged"
    assert (
        export(
            "--model", base, "--adapter", tmp_path / "adapter", "--format", "safetensors", "--out", exported
        )
        == 0
    )
    assert (
        main(["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(merged)])
        == 0
    )
    ours, theirs = load_file(exported / "model.safetensors"), load_file(merged / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)  # same path
    got = logits(AutoModelForCausalLM.from_pretrained(exported), IDS)
    assert np.max(np.abs(got - expected)) <= 1e-5  # float32 merge, PEFT vs peftdecl
    assert (exported / "tokenizer.json").is_file()


def test_safetensors_on_mlx_loads_in_transformers(base: Path, tmp_path: Path) -> None:
    needs("mlx")  # PEFT on torch only builds the adapter and the reference logits
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    peft_model = peft_adapter(base, tmp_path / "adapter")
    expected = logits(peft_model.merge_and_unload(), IDS)
    out = tmp_path / "mlx"
    args = ("--model", base, "--adapter", tmp_path / "adapter", "--format", "safetensors", "--out", out)
    assert export(*args, "--backend", "mlx") == 0
    got = logits(AutoModelForCausalLM.from_pretrained(out), IDS)
    assert np.max(np.abs(got - expected)) <= 1e-5  # float32 merge in MLX vs PEFT's in torch


# -- onnx ----------------------------------------------------------------------------------------------------
def test_onnx_logits_equal_peft(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    needs("torch")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    peft_model = peft_adapter(base, tmp_path / "adapter")
    out = tmp_path / "model.onnx"
    assert export("--model", base, "--adapter", tmp_path / "adapter", "--format", "onnx", "--out", out) == 0
    assert "onnxruntime vs model logits" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for ids in (IDS, [[7, 3, 9]] * 3):  # batch and sequence sizes other than the check's: dynamic axes
        (got,) = session.run(None, {"input_ids": np.array(ids, np.int64)})
        assert np.max(np.abs(got - logits(peft_model, ids))) <= 1e-4  # onnxruntime float32 vs PEFT unmerged


def test_onnx_external_data_and_refusals(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    needs("torch")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from peftdecl.cli_model import _loaded
    from peftdecl.export.onnx import export_onnx

    peft_model = peft_adapter(base, tmp_path / "adapter")
    out = tmp_path / "ext.onnx"

    class Args:
        model, adapter, backend = base, tmp_path / "adapter", "torch"

    backend, model, _ = _loaded(Args, device="cpu")
    assert export_onnx(backend, model, out, external_data=True) <= 1e-4
    onnx = pytest.importorskip("onnx")
    initializers = onnx.load(str(out), load_external_data=False).graph.initializer
    external = [t for t in initializers if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 7 * LAYERS  # the projection weights live beside the graph, in ext.onnx.data
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"ext.onnx.data"}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": np.array(IDS, np.int64)})
    assert np.max(np.abs(got - logits(peft_model, IDS))) <= 1e-4  # float32
    assert re.search(
        "exists",
        refused(capsys, "--model", base, "--adapter", tmp_path / "adapter", "--format", "onnx", "--out", out),
    )
    args = (
        "--model",
        base,
        "--adapter",
        tmp_path / "adapter",
        "--format",
        "onnx",
        "--out",
        tmp_path / "x.onnx",
    )
    assert "--dtype applies to --format safetensors" in refused(capsys, *args, "--dtype", "float16")
    assert not (tmp_path / "x.onnx").exists()


# -- gguf ----------------------------------------------------------------------------------------------------
def llama_cpp_rows(out: int, heads: int) -> np.ndarray:
    """Row i of llama.cpp's q/k weight is HF row rows[i]: per head of size d, position 2j + h takes HF row
    h·d/2 + j (h = 0, 1: the two RoPE halves interleaved)."""
    d = out // heads
    return np.array([head * d + (i % 2) * (d // 2) + i // 2 for head in range(heads) for i in range(d)])


def read_gguf(path: Path) -> tuple[dict[str, object], dict[str, object]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize(
    "config",
    [
        {},
        {
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {"down_proj": 3.0, "o_proj": 0.5},
            "use_rslora": True,
        },
    ],
    ids=["plain", "patterns_rslora"],
)
def test_gguf_reads_back_as_llama_cpp_layout(base: Path, tmp_path: Path, config: dict[str, object]) -> None:
    needs("torch")
    gguf = pytest.importorskip("gguf")
    peft_model = peft_adapter(base, tmp_path / "adapter", **config)
    out = tmp_path / "adapter.gguf"
    assert export("--model", base, "--adapter", tmp_path / "adapter", "--format", "gguf", "--out", out) == 0
    fields, tensors = read_gguf(out)
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    expected_names = {
        f"blk.{i}.{n}.weight.lora_{ab}" for i in range(LAYERS) for n in names.values() for ab in "ab"
    }
    assert set(tensors) == expected_names
    for module_name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        layer, proj = module_name.split(".layers.")[1].split(".")[0], module_name.rsplit(".", 1)[1]
        a_src = module.lora_A["default"].weight.detach().numpy()
        b_src = module.lora_B["default"].weight.detach().numpy()
        scaling = module.scaling["default"]
        r = a_src.shape[0]
        a = tensors[f"blk.{layer}.{names[proj]}.weight.lora_a"]
        b = tensors[f"blk.{layer}.{names[proj]}.weight.lora_b"]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(a.shape) == [a_src.shape[1], r] and list(b.shape) == [r, b_src.shape[0]]  # GGUF ne order
        assert np.array_equal(a.data, a_src)  # float32, exact
        rows = {
            "q_proj": llama_cpp_rows(b_src.shape[0], HEADS),
            "k_proj": llama_cpp_rows(b_src.shape[0], KV_HEADS),
        }
        want_b = b_src[rows.get(proj, np.arange(b_src.shape[0]))]
        # llama.cpp adds alpha/r · B A x; PEFT adds scaling · B A x: the ratio lives in lora_b
        ratio = scaling / (8.0 / r)
        np.testing.assert_allclose(b.data, want_b * ratio, rtol=1e-6, atol=0)  # float32 product by the ratio
        if ratio == 1.0:
            assert np.array_equal(b.data, want_b)


def test_gguf_refusals_write_nothing(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    needs("torch")
    pytest.importorskip("gguf")
    peft_adapter(base, tmp_path / "dora", use_dora=True)
    out = tmp_path / "a.gguf"
    assert re.search(
        "dora: llama.cpp's GGUF adapters hold plain LoRA only",
        refused(capsys, "--model", base, "--adapter", tmp_path / "dora", "--format", "gguf", "--out", out),
    )
    peft_adapter(base, tmp_path / "embed", target_modules=["q_proj", "embed_tokens"])
    assert re.search(
        "model.embed_tokens: a lora embedding layer",
        refused(capsys, "--model", base, "--adapter", tmp_path / "embed", "--format", "gguf", "--out", out),
    )
    assert re.search(
        "not a folder",
        refused(capsys, "--model", base, "--adapter", tmp_path / "missing", "--format", "gguf", "--out", out),
    )
    assert re.search(
        "no config.json",
        refused(
            capsys,
            "--model",
            tmp_path / "nomodel",
            "--adapter",
            tmp_path / "dora",
            "--format",
            "gguf",
            "--out",
            out,
        ),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora", "embed"]  # nothing written, no staging left


def test_gguf_refuses_other_architectures_and_existing_out(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    needs("torch")
    pytest.importorskip("gguf")
    import json
    import shutil

    other = tmp_path / "gpt"
    shutil.copytree(base, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    assert re.search(
        r"\$\.architectures\[0\]: 'GPT2LMHeadModel' is not supported",
        refused(
            capsys, "--model", other, "--adapter", tmp_path, "--format", "gguf", "--out", tmp_path / "a.gguf"
        ),
    )
    (tmp_path / "taken.gguf").write_bytes(b"keep")
    assert re.search(
        "exists; export to a new path",
        refused(
            capsys,
            "--model",
            base,
            "--adapter",
            tmp_path,
            "--format",
            "gguf",
            "--out",
            tmp_path / "taken.gguf",
        ),
    )
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep"
