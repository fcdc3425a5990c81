"""The inventory records a quantised base layer's full scheme (the IR's ``LayerInfo.quant_scheme``), read from
bitsandbytes layers as transformers builds them and from MLX's ``QuantizedLinear``."""

from __future__ import annotations

import os

import pytest

from peftdecl.quant.scheme import QuantScheme
from peftdecl.train.tiny_model import build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=64, layers=1, intermediate=128)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
         QuantScheme("nf4", block_size=64, double_quant=True, nested_block_size=256)),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, QuantScheme("fp4", block_size=64)),
        ({"load_in_8bit": True, "llm_int8_threshold": 6.0}, QuantScheme("int8", threshold=6.0)),
    ],
    ids=["nf4-double", "fp4", "int8"],
)  # fmt: skip
def test_torch_inventory_reads_the_bitsandbytes_scheme(folder, options, expected):
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from peftdecl_torch.inventory import inventory

    config = transformers.BitsAndBytesConfig(**options)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu"
    )
    layer = inventory(model).layers["model.layers.0.self_attn.q_proj"]
    assert layer.quant_scheme == expected
    assert layer.quantization == expected.name
    assert inventory(model).layers["lm_head"].quant_scheme is None  # transformers keeps the head in float


@pytest.mark.parametrize(("bits", "group_size"), [(4, 64), (8, 32)])
def test_mlx_inventory_reads_the_affine_scheme(folder, bits, group_size):
    from conftest import selected_backends

    if "mlx" not in selected_backends():
        pytest.skip("the mlx backend is not installed or not selected")
    import mlx.nn as nn
    import mlx_lm

    from peftdecl_mlx.inventory import layer_info

    model, _ = mlx_lm.load(str(folder))
    nn.quantize(model, group_size=group_size, bits=bits)
    info = layer_info(model.model.layers[0].self_attn.q_proj)
    assert info is not None and info.quant_scheme == QuantScheme("affine", bits=bits, group_size=group_size)
    assert info.quantization == "mlx_affine" == info.quant_scheme.name
