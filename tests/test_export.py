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


def test_mlx_backend_exports_safetensors_and_gguf(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    needs("mlx")  # PEFT on torch only builds the adapter and the reference logits
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    peft_model = peft_adapter(base, tmp_path / "adapter")
    down_a = (
        peft_model.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight.detach().numpy()
    )
    expected = logits(peft_model.merge_and_unload(), IDS)

    def to(fmt: str, out: Path) -> tuple[object, ...]:
        return (
            "--model",
            base,
            "--adapter",
            tmp_path / "adapter",
            "--format",
            fmt,
            "--out",
            out,
            "--backend",
            "mlx",
        )

    assert export(*to("safetensors", tmp_path / "mlx")) == 0
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "mlx"), IDS)
    assert np.max(np.abs(got - expected)) <= 1e-5  # float32 merge in MLX vs PEFT's in torch
    assert export(*to("gguf", tmp_path / "a.gguf")) == 0  # the adapter's tensors as the MLX engine holds them
    assert np.array_equal(
        read_gguf(tmp_path / "a.gguf")[1]["blk.1.ffn_down.weight.lora_a"].data, down_a
    )  # exact
    message = refused(capsys, *to("onnx", tmp_path / "m.onnx"))
    assert "backend 'mlx' cannot export ONNX (use --backend torch)" in message


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
    from peftdecl.cli_model import load_model_and_adapter
    from peftdecl.export.onnx import export_onnx

    peft_model = peft_adapter(base, tmp_path / "adapter")
    out = tmp_path / "ext.onnx"

    class Args:
        model, adapter, backend = base, tmp_path / "adapter", "torch"

    backend, model, _ = load_model_and_adapter(Args, device="cpu")
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


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "lm_head": "output",
              "embed_tokens": "token_embd"}  # fmt: skip
"""HF module -> llama.cpp tensor (llama.cpp's llama-arch names)."""


def gguf_name(module: str) -> str:
    leaf = module.rsplit(".", 1)[-1]
    if ".layers." not in module:
        return f"{GGUF_NAMES[leaf]}.weight"
    return f"blk.{module.split('.layers.')[1].split('.')[0]}.{GGUF_NAMES[leaf]}.weight"


def peft_factors(peft_model):  # type: ignore[no-untyped-def]
    """(module, A, B, scaling, is_embedding) of every LoRA layer of a PEFT model, read from PEFT's own modules."""
    for module_name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        elif hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
            a, b = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
        else:
            continue
        name = module_name.removeprefix("base_model.model.")
        yield name, a.detach().numpy(), b.detach().numpy(), module.scaling["default"], "embed" in name


@pytest.mark.parametrize(
    "config",
    [
        {},
        {
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {"down_proj": 3.0, "o_proj": 0.5},
            "use_rslora": True,
        },
        {"target_modules": ["q_proj", "lm_head", "embed_tokens"], "rank_pattern": {"lm_head": 3}},
    ],
    ids=["plain", "patterns_rslora", "head_and_embeddings"],
)
def test_gguf_reads_back_as_llama_cpp_layout(
    base: Path, tmp_path: Path, config: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    needs("torch")
    gguf = pytest.importorskip("gguf")
    peft_model = peft_adapter(base, tmp_path / "adapter", **config)
    out = tmp_path / "adapter.gguf"
    assert export("--model", base, "--adapter", tmp_path / "adapter", "--format", "gguf", "--out", out) == 0
    printed = capsys.readouterr().out
    fields, tensors = read_gguf(out)
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    factors = list(peft_factors(peft_model))
    assert set(tensors) == {f"{gguf_name(m)}.lora_{ab}" for m, *_ in factors for ab in "ab"}
    for module, a_src, b_src, scaling, is_embedding in factors:
        r, leaf = a_src.shape[0], module.rsplit(".", 1)[-1]
        a, b = tensors[f"{gguf_name(module)}.lora_a"], tensors[f"{gguf_name(module)}.lora_b"]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        # llama.cpp's checks, in GGUF ne order: linear a [in, r], b [r, out]; token_embd a [r, vocab], b [r, hidden]
        want_a = a_src.T if is_embedding else a_src
        assert list(a.shape) == list(reversed(want_a.shape)) and list(b.shape) == [r, b_src.shape[0]]
        assert np.array_equal(a.data, want_a)  # float32, exact
        rows = {
            "q_proj": llama_cpp_rows(b_src.shape[0], HEADS),
            "k_proj": llama_cpp_rows(b_src.shape[0], KV_HEADS),
        }
        want_b = b_src[rows.get(leaf, np.arange(b_src.shape[0]))]
        # llama.cpp adds alpha/r · B A x; PEFT adds scaling · B A x: the ratio lives in lora_b
        ratio = scaling / (8.0 / r)
        np.testing.assert_allclose(b.data, want_b * ratio, rtol=1e-6, atol=0)  # float32 product by the ratio
        if ratio == 1.0:
            assert np.array_equal(b.data, want_b)
        else:  # the command says which lora_b carries a factor
            assert f"{module}: scaling differs from alpha/r; lora_b holds the factor {ratio:.6g}" in printed


def test_gguf_refusals_write_nothing(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    needs("torch")
    pytest.importorskip("gguf")
    peft_adapter(base, tmp_path / "dora", use_dora=True)
    peft_adapter(base, tmp_path / "bias", lora_bias=True)
    out = tmp_path / "a.gguf"

    def gguf_refused(model: Path, adapter: Path) -> str:
        return refused(capsys, "--model", model, "--adapter", adapter, "--format", "gguf", "--out", out)

    assert "'default' is dora: llama.cpp's GGUF adapters hold plain LoRA only" in gguf_refused(
        base, tmp_path / "dora"
    )
    bias = gguf_refused(base, tmp_path / "bias")
    assert (
        "self_attn.q_proj: a lora linear layer with ['lora_A.weight', 'lora_B.bias', 'lora_B.weight']" in bias
    )
    assert "not a folder" in gguf_refused(base, tmp_path / "missing")
    assert "no config.json" in gguf_refused(tmp_path / "nomodel", tmp_path / "dora")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bias", "dora"]  # nothing written, no staging left


def test_gguf_refuses_other_bases_and_existing_out(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    needs("torch")
    pytest.importorskip("gguf")
    import json
    import shutil

    def variant(name: str, **changes: object) -> Path:
        folder = tmp_path / name
        shutil.copytree(base, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return folder

    def gguf_refused(model: Path, adapter: Path, out: Path) -> str:
        return refused(capsys, "--model", model, "--adapter", adapter, "--format", "gguf", "--out", out)

    gpt = variant("gpt", architectures=["GPT2LMHeadModel"])
    message = gguf_refused(gpt, tmp_path, tmp_path / "a.gguf")
    assert "config.json $.architectures[0]: 'GPT2LMHeadModel' is not supported" in message
    tied = variant("tied", tie_word_embeddings=True)
    peft_adapter(tied, tmp_path / "head", target_modules=["lm_head"])
    message = gguf_refused(tied, tmp_path / "head", tmp_path / "a.gguf")
    assert "lm_head: config.json $.tie_word_embeddings is true" in message
    assert not (tmp_path / "a.gguf").exists()
    (tmp_path / "taken.gguf").write_bytes(b"keep")
    assert "exists; export to a new path" in gguf_refused(base, tmp_path / "head", tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep"
