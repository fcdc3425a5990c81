"""Quantised checkpoint folders: ``check_quantized_folder`` on complete and broken folders, and ``quantize_folder``
against the tools whose layout it writes, on the same tiny Llama.

- bitsandbytes: ``AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(...),
  device_map="cpu").save_pretrained(ref)`` — every tensor of our folder equals the tool's byte for byte (names,
  dtypes, shapes, bytes), the ``quantization_config`` equals the one transformers writes, and transformers loads
  our folder into bitsandbytes layers giving exactly the tool's folder's logits (tolerance 0: the same bytes and
  the same config make the same computation).
- mlx-lm: ``mlx_lm.convert(src, ref, quantize=True, q_bits=b, q_group_size=g)`` — arrays equal bit for bit,
  ``config.json`` equal byte for byte, and ``mlx_lm.load`` gives exactly the tool's logits (tolerance 0).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from peftdecl.errors import PeftdeclError
from peftdecl.quant import folder_write
from peftdecl.quant.folder import check_quantized_folder, tensor_headers
from peftdecl.quant.folder_write import quantize_folder
from peftdecl.train.tiny_model import build_tiny_llama
from tests.conftest import selected_backends

os.environ.setdefault("HF_HUB_OFFLINE", "1")

Q = "model.layers.0.self_attn.q_proj"
LAYOUTS = {
    "nf4-double": ({"bits": 4, "kind": "nf4", "double_quant": True}, "bnb_4bit"),
    "fp4": ({"bits": 4, "kind": "fp4"}, "bnb_4bit"),
    "int8": ({"bits": 8, "kind": "int8"}, "bnb_8bit"),
    "affine": ({"bits": 4, "kind": "affine", "group_size": 32}, "mlx_affine"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=64, layers=1, intermediate=128)


@pytest.fixture(scope="module")
def quantized(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama quantised by peftdecl into each layout (read-only: tests copy before breaking one)."""
    root = tmp_path_factory.mktemp("quantized")
    return {name: quantize_folder(tiny, root / name, **kwargs).out for name, (kwargs, _) in LAYOUTS.items()}


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _drop(file: Path, key: str) -> None:
    """Rewrite one safetensors file without ``key`` (float32 tiny model: every dtype NumPy holds)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(file))
    del tensors[key]
    save_file(tensors, str(file))


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


# -- check_quantized_folder -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_check_names_the_layout(quantized: dict[str, Path], layout: str) -> None:
    assert check_quantized_folder(quantized[layout]) == LAYOUTS[layout][1]


def test_check_float_folder_is_none(tiny: Path) -> None:
    assert check_quantized_folder(tiny) is None


@pytest.mark.parametrize(
    ("layout", "key"),
    [
        ("nf4-double", f"{Q}.weight.absmax"),
        ("nf4-double", f"{Q}.weight.quant_map"),
        ("nf4-double", f"{Q}.weight.nested_absmax"),
        ("nf4-double", f"{Q}.weight.nested_quant_map"),
        ("nf4-double", f"{Q}.weight.quant_state.bitsandbytes__nf4"),
        ("fp4", f"{Q}.weight.quant_state.bitsandbytes__fp4"),
        ("int8", f"{Q}.SCB"),
        ("affine", f"{Q}.scales"),
        ("affine", f"{Q}.biases"),
    ],
)
def test_missing_state_names_file_and_key(
    quantized: dict[str, Path], tmp_path: Path, layout: str, key: str
) -> None:
    folder = _copy(quantized[layout], tmp_path)
    _drop(folder / "model.safetensors", key)
    with pytest.raises(PeftdeclError) as error:
        check_quantized_folder(folder)
    assert str(folder / "model.safetensors") in str(error.value)
    assert repr(key) in str(error.value) and "missing" in str(error.value)


def test_missing_quantised_weight_named(quantized: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(quantized["int8"], tmp_path)
    _drop(folder / "model.safetensors", f"{Q}.weight")
    with pytest.raises(
        PeftdeclError, match=rf"{Q}\.SCB is quantisation state .* of {Q}\.weight, which is missing"
    ):
        check_quantized_folder(folder)


def test_sharded_folder_names_the_shard(quantized: dict[str, Path], tmp_path: Path) -> None:
    """Split the nf4 folder into two shards with an index: checked alike, and a missing key names its shard."""
    folder = _copy(quantized["nf4-double"], tmp_path)
    _split(folder)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert check_quantized_folder(folder) == "bnb_4bit"
    key = f"{Q}.weight.absmax"
    _drop(folder / weight_map[key], key)
    with pytest.raises(PeftdeclError, match=rf"{weight_map[f'{Q}.weight']}: .*'{key}' is missing"):
        check_quantized_folder(folder)
    (folder / weight_map[key]).unlink()
    with pytest.raises(PeftdeclError, match=f"{weight_map[key]}: file not found"):
        check_quantized_folder(folder)


def _all_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = {header.file for header in tensor_headers(folder).values()}
    return {k: v for file in files for k, v in load_file(str(file)).items()}


def _split(folder: Path) -> None:
    """Replace ``model.safetensors`` by two shards and an index, as transformers shards a large model."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_source_and_output(
    tiny: Path, quantized: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sharded source quantises to the same tensors as the single file; a small shard limit writes shards
    and an index that the checker (and transformers, below) reads as one checkpoint."""
    source = _copy(tiny, tmp_path)
    _split(source)
    kwargs = LAYOUTS["nf4-double"][0]
    from_shards = quantize_folder(source, tmp_path / "from_shards", **kwargs).out  # type: ignore[arg-type]
    single = _all_tensors(quantized["nf4-double"])
    got = _all_tensors(from_shards)
    assert sorted(got) == sorted(single)
    assert all(got[k].dtype == single[k].dtype and got[k].tobytes() == single[k].tobytes() for k in single)
    monkeypatch.setattr(folder_write, "SHARD_BYTES", 20_000)
    sharded = quantize_folder(tiny, tmp_path / "sharded", **kwargs).out  # type: ignore[arg-type]
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert check_quantized_folder(sharded) == "bnb_4bit"
    got = _all_tensors(sharded)
    assert sorted(got) == sorted(single)
    assert all(got[k].tobytes() == single[k].tobytes() for k in single)


def test_bin_checkpoints(tiny: Path, tmp_path: Path) -> None:
    """A float folder with PyTorch .bin weights is simply not quantised; a quantised one must be safetensors."""
    folder = _copy(tiny, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert check_quantized_folder(folder) is None
    _edit_config(folder, quantization={"group_size": 64, "bits": 4})
    with pytest.raises(PeftdeclError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        check_quantized_folder(folder)


def test_declared_but_nothing_quantised(tiny: Path, tmp_path: Path) -> None:
    folder = _copy(tiny, tmp_path)
    _edit_config(folder, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(
        PeftdeclError, match=r"declares bnb_4bit quantisation, but no weight in model.safetensors"
    ):
        check_quantized_folder(folder)


def test_config_that_lost_its_quantisation(quantized: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(quantized["fp4"], tmp_path)
    _edit_config(folder, quantization_config=None)
    with pytest.raises(PeftdeclError, match=r"holds quantisation state .* no quantization_config"):
        check_quantized_folder(folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method 'gptq'"),
        ({"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}, "mode 'mxfp4'"),
        ({"quantization": {"group_size": 32}}, "integer 'bits'"),
        (
            {
                "quantization_config": {
                    "quant_method": "bitsandbytes",
                    "load_in_4bit": True,
                    "load_in_8bit": True,
                }
            },
            "exactly one of load_in_4bit and load_in_8bit",
        ),
    ],
)
def test_unsupported_quantisation_refused(tiny: Path, tmp_path: Path, changes: dict, message: str) -> None:
    folder = _copy(tiny, tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(PeftdeclError, match=message):
        check_quantized_folder(folder)


def test_quantize_refuses_quantised_source_and_used_out(
    quantized: dict[str, Path], tiny: Path, tmp_path: Path
) -> None:
    with pytest.raises(PeftdeclError, match=r"already quantised \(bnb_8bit\)"):
        quantize_folder(quantized["int8"], tmp_path / "again", bits=4, kind="nf4")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(PeftdeclError, match="not empty"):
        quantize_folder(tiny, tmp_path / "used", bits=4, kind="nf4")
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    with pytest.raises(PeftdeclError, match=r"bits 8: bitsandbytes nf4 is 4-bit"):
        quantize_folder(tiny, tmp_path / "new", bits=8, kind="nf4")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kind", ["nf4", "affine"])
def test_quantize_names_a_non_finite_weight(tiny: Path, tmp_path: Path, kind: str) -> None:
    from safetensors.numpy import load_file, save_file

    source = _copy(tiny, tmp_path)
    tensors = load_file(str(source / "model.safetensors"))
    tensors[f"{Q}.weight"][3, 5] = np.inf
    save_file(tensors, str(source / "model.safetensors"))
    with pytest.raises(PeftdeclError, match=rf"{Q}\.weight: .*(non-finite|inf or NaN)"):
        quantize_folder(source, tmp_path / "out", bits=4, kind=kind)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_quantize_refuses_unknown_architecture(tiny: Path, tmp_path: Path) -> None:
    source = _copy(tiny, tmp_path)
    _edit_config(source, model_type="gpt2")
    with pytest.raises(PeftdeclError, match="model_type 'gpt2': peftdecl quantize knows which layers"):
        quantize_folder(source, tmp_path / "out", bits=4, kind="nf4")


# -- against transformers + bitsandbytes ----------------------------------------------------------------------
NF4_DOUBLE = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
BNB = {  # case: (source dtype, quantize_folder arguments, BitsAndBytesConfig arguments)
    "nf4": ("float32", {"bits": 4, "kind": "nf4"}, {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
    "nf4-double-bf16-compute": (
        "float32",
        {"bits": 4, "kind": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        {**NF4_DOUBLE, "bnb_4bit_compute_dtype": "bfloat16"},
    ),
    "fp4-double": (
        "float32",
        {"bits": 4, "kind": "fp4", "double_quant": True},
        {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    ),
    "int8": ("float32", {"bits": 8, "kind": "int8"}, {"load_in_8bit": True}),
    "nf4-double-bf16-source": ("bfloat16", {"bits": 4, "kind": "nf4", "double_quant": True}, NF4_DOUBLE),
    "int8-bf16-source": ("bfloat16", {"bits": 8, "kind": "int8"}, {"load_in_8bit": True}),
}


def _torch_stack():  # type: ignore[no-untyped-def]
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    return torch, transformers, bnb


@pytest.fixture(scope="module")
def tiny_bf16(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved by transformers in bfloat16 (config ``dtype: bfloat16``, BF16 tensors)."""
    torch, transformers, _ = _torch_stack()
    folder = tmp_path_factory.mktemp("tiny_bf16")
    transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).save_pretrained(folder)
    for path in tiny.glob("tokenizer*"):
        shutil.copy(path, folder)
    return folder


@pytest.mark.parametrize("case", BNB)
def test_bnb_folder_equals_transformers(case: str, tiny: Path, tiny_bf16: Path, tmp_path: Path) -> None:
    """bfloat16 sources: the floats stay bfloat16, 4-bit codes come from the bfloat16 values, and int8 from
    their float16 rounding (bitsandbytes' Int8Params)."""
    torch, transformers, bnb = _torch_stack()
    from safetensors.torch import load_file

    source_dtype, ours_kwargs, bnb_kwargs = BNB[case]
    source = tiny_bf16 if source_dtype == "bfloat16" else tiny
    config = transformers.BitsAndBytesConfig(**bnb_kwargs)
    tool = tmp_path / "tool"
    transformers.AutoModelForCausalLM.from_pretrained(
        source, quantization_config=config, device_map="cpu"
    ).save_pretrained(tool)
    ours = quantize_folder(source, tmp_path / "ours", **ours_kwargs).out  # type: ignore[arg-type]

    expected, actual = load_file(str(tool / "model.safetensors")), load_file(str(ours / "model.safetensors"))
    assert sorted(actual) == sorted(expected)
    for key, want in expected.items():
        got = actual[key]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), key
        assert got.reshape(-1).view(torch.uint8).tolist() == want.reshape(-1).view(torch.uint8).tolist(), key
    tool_config = json.loads((tool / "config.json").read_text())
    our_config = json.loads((ours / "config.json").read_text())
    assert our_config["quantization_config"] == tool_config["quantization_config"]
    assert check_quantized_folder(tool) == check_quantized_folder(ours)

    ids = torch.tensor([[5, 17, 42, 8, 63, 21, 9]])
    logits = []
    for folder in (tool, ours):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
        layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
        assert len(layers) == 7  # q, k, v, o, gate, up, down: the output head and embeddings stay float
        for layer in layers:
            layer.support_avx512bf16_for_cpu = False  # keep the stored 4-bit layout (see reference notes)
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])  # tolerance 0: same bytes, same config, same computation


def test_transformers_loads_sharded_output(
    tiny: Path, quantized: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch, transformers, _ = _torch_stack()
    monkeypatch.setattr(folder_write, "SHARD_BYTES", 20_000)
    sharded = quantize_folder(tiny, tmp_path / "sharded", **LAYOUTS["int8"][0]).out  # type: ignore[arg-type]
    ids = torch.tensor([[5, 17, 42, 8]])
    logits = []
    for folder in (quantized["int8"], sharded):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])  # tolerance 0: the same tensors, split over several files


# -- against mlx-lm -------------------------------------------------------------------------------------------
def _mlx_stack():  # type: ignore[no-untyped-def]
    if "mlx" not in selected_backends():
        pytest.skip("the mlx backend is not selected")
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    return mx, mlx_lm


@pytest.mark.parametrize(
    ("bits", "group_size", "variant"),
    [(4, 64, "float32"), (3, 32, "bfloat16-config"), (8, 128, "tied")],
)
def test_mlx_folder_equals_mlx_lm_convert(
    tiny: Path, tmp_path: Path, bits: int, group_size: int, variant: str
) -> None:
    """``bfloat16-config``: float32 tensors under ``torch_dtype: bfloat16``, which mlx-lm casts before
    quantising; ``tied``: ``tie_word_embeddings`` with an ``lm_head.weight`` in the file, which mlx-lm drops, and a
    generation config whose eos list it copies into the config."""
    mx, mlx_lm = _mlx_stack()
    source = _copy(tiny, tmp_path)
    if variant == "bfloat16-config":
        _edit_config(source, torch_dtype="bfloat16")
    if variant == "tied":
        _edit_config(source, tie_word_embeddings=True)
        (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    tool = tmp_path / "tool"
    mlx_lm.convert(str(source), str(tool), quantize=True, q_bits=bits, q_group_size=group_size)
    ours = quantize_folder(source, tmp_path / "ours", bits=bits, kind="affine", group_size=group_size).out

    expected, actual = mx.load(str(tool / "model.safetensors")), mx.load(str(ours / "model.safetensors"))
    assert sorted(actual) == sorted(expected)
    for key, want in expected.items():
        got = actual[key]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), key
        as_bits = {mx.float32: mx.uint32, mx.bfloat16: mx.uint16, mx.float16: mx.uint16}.get(want.dtype)
        if as_bits is not None:
            got, want = got.view(as_bits), want.view(as_bits)
        assert mx.array_equal(got, want).item(), key
    assert (ours / "config.json").read_text() == (tool / "config.json").read_text()
    assert check_quantized_folder(tool) == check_quantized_folder(ours) == "mlx_affine"

    ids = mx.array([[5, 17, 42, 8, 63, 21, 9]])
    logits = [np.array(mlx_lm.load(str(folder))[0](ids).astype(mx.float32)) for folder in (tool, ours)]
    assert np.array_equal(logits[0], logits[1])  # tolerance 0: same arrays, same config, same computation


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sizes off the blocks: 40 inputs (no MLX group divides it, k/v hold 800 weights: a partial 4-bit block)
    and 96 inputs to down_proj (MLX groups of 32 only)."""
    folder = tmp_path_factory.mktemp("odd")
    return build_tiny_llama(folder, hidden=40, layers=1, heads=4, kv_heads=2, intermediate=96)


def test_odd_sizes_bnb(odd: Path, tmp_path: Path) -> None:
    torch, transformers, _ = _torch_stack()
    from safetensors.torch import load_file

    config = transformers.BitsAndBytesConfig(**NF4_DOUBLE)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        odd, quantization_config=config, device_map="cpu"
    )
    model.save_pretrained(tmp_path / "tool")
    ours = quantize_folder(odd, tmp_path / "ours", bits=4, kind="nf4", double_quant=True).out
    expected, actual = (
        load_file(str(tmp_path / "tool" / "model.safetensors")),
        load_file(str(ours / "model.safetensors")),
    )
    assert sorted(actual) == sorted(expected)
    assert all(actual[k].dtype == expected[k].dtype and torch.equal(actual[k], expected[k]) for k in expected)


def test_odd_sizes_mlx(odd: Path, tmp_path: Path) -> None:
    mx, mlx_lm = _mlx_stack()
    mlx_lm.convert(str(odd), str(tmp_path / "tool"), quantize=True, q_bits=4, q_group_size=32)
    ours = quantize_folder(odd, tmp_path / "ours", bits=4, kind="affine", group_size=32).out
    expected, actual = (
        mx.load(str(tmp_path / "tool" / "model.safetensors")),
        mx.load(str(ours / "model.safetensors")),
    )
    assert sorted(actual) == sorted(expected)
    assert all(
        actual[k].dtype == expected[k].dtype and mx.array_equal(actual[k], expected[k]).item()
        for k in expected
    )
    assert [k for k, v in actual.items() if v.dtype == mx.uint32] == ["model.layers.0.mlp.down_proj.weight"]
