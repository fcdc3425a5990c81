"""LoRA on torch's nn.MultiheadAttention (kind ``lora_mha``) against HF PEFT 0.21, torch's own attention and
finite differences.

Expected numbers come from the real PEFT (its forward, merge_and_unload, saved keys, autograd gradients), from
torch's ``F.multi_head_attention_forward`` on weights built here, and from central differences of the NumPy
reference. Tolerances (relative, ``rel_err``): float32 outputs ≤ 1e-5 (float32 rounding of a few products and
a softmax); float64 against float64 ≤ 1e-10; finite differences (h = 1e-6, float64) ≤ 1e-6.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import PeftdeclError, SpecError, TargetError
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
F = torch.nn.functional
nn = torch.nn

pytestmark = pytest.mark.peft
if not {"numpy", "torch"} <= set(selected_backends()):
    pytest.skip("compares the torch backend with the NumPy reference", allow_module_level=True)

EMBED, HEADS, R, ALPHA = 8, 2, 3, 6
F32_TOL, F64_TOL, FD_TOL = 1e-5, 1e-10, 1e-6


class Attention(nn.Module):
    """PEFT's test model ModelMha, smaller: self-attention then a linear head."""

    def __init__(self, batch_first: bool = False, kdim: int | None = None) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.lin0 = nn.Linear(EMBED, 3)

    def forward(self, x: Any) -> Any:
        return self.lin0(self.mha(x, x, x)[0])


def base_model(batch_first: bool = False, dtype: Any = None) -> Any:
    torch.manual_seed(0)
    return Attention(batch_first).to(dtype or torch.float32).eval()


def inputs(dtype: Any = None) -> Any:
    return torch.randn(4, 2, EMBED, generator=torch.Generator().manual_seed(1), dtype=dtype or torch.float32)


def peft_wrapped(targets: list[str], batch_first: bool = False, dtype: Any = None, **config: Any) -> Any:
    """PEFT's model with every adapter tensor moved away from its initial value by seeded noise."""
    config = {"r": R, "lora_alpha": ALPHA, "init_lora_weights": False, **config}
    torch.manual_seed(2)
    wrapped = peft.get_peft_model(
        base_model(batch_first, dtype), peft.LoraConfig(target_modules=targets, **config)
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in wrapped.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return wrapped.eval()


def reference(folder: Path, batch_first: bool = False) -> peftdecl.AdaptedModel:
    """The NumPy reference on the same base weights, with PEFT's saved adapter."""
    from peftdecl_torch.inventory import numpy_model

    state, layer_types, _ = numpy_model(base_model(batch_first))
    return peftdecl.load_adapter(state, folder, backend="numpy", layer_types=layer_types)


def as_numpy(t: Any) -> np.ndarray:
    return t.detach().double().numpy()


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("targets", [["mha"], ["mha", "lin0"]])
def test_peft_folder_gives_peft_outputs_and_merge(
    targets: list[str], batch_first: bool, tmp_path: Path
) -> None:
    wrapped = peft_wrapped(targets, batch_first)
    x = inputs()
    with torch.no_grad():
        expected = wrapped(x)
    wrapped.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(base_model(batch_first), tmp_path, backend="torch")
    with torch.no_grad():
        assert rel_err(as_numpy(ours(x)), as_numpy(expected)) <= F32_TOL
        merged = ours.merge_and_unload()
        assert type(merged.mha) is nn.MultiheadAttention
        theirs = wrapped.merge_and_unload()
        assert rel_err(as_numpy(merged(x)), as_numpy(theirs(x))) <= F32_TOL
        for key in ("mha.in_proj_weight", "mha.out_proj.weight"):
            assert rel_err(as_numpy(merged.state_dict()[key]), as_numpy(theirs.state_dict()[key])) <= 1e-6, (
                key
            )
    # the NumPy reference (float64) on the same folder, layer by layer
    ref = reference(tmp_path, batch_first)
    y = ref("mha", x.double().numpy())
    y = ref("lin0", y) if "lin0" in targets else y @ ref.base_weight("lin0").T + as_numpy(wrapped.lin0.bias)
    assert rel_err(y, as_numpy(expected)) <= F32_TOL


def test_reference_attention_is_torch_attention_on_the_adapted_weights(tmp_path: Path) -> None:
    """W' = [W_in + s B A ; W_out + 2s B' A'] (PEFT 0.21's out_proj factor), through torch's own attention."""
    wrapped = peft_wrapped(["mha"], dtype=torch.float64)
    wrapped.save_pretrained(tmp_path, safe_serialization=True)
    ref = reference(tmp_path)
    tensors = ref.state_dict()
    s = ALPHA / R
    mha = base_model(dtype=torch.float64).mha
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in tensors.items()}
    w_in = mha.in_proj_weight + s * t["mha.lora_B.weight"] @ t["mha.lora_A.weight"]
    w_out = mha.out_proj.weight + 2 * s * (
        t["mha.base_layer.out_proj.lora_B.weight"] @ t["mha.base_layer.out_proj.lora_A.weight"]
    )
    x = inputs(torch.float64)
    expected = F.multi_head_attention_forward(
        x, x, x, EMBED, HEADS, w_in, mha.in_proj_bias, None, None, False, 0.0, w_out, mha.out_proj.bias,
        training=False, need_weights=False,
    )[0]  # fmt: skip
    # the saved file is float32: compare with the weights the reference holds, which came from it
    assert rel_err(ref("mha", x.numpy()), as_numpy(expected)) <= F64_TOL


def test_peftdecl_folder_loads_in_peft_with_peft_keys(tmp_path: Path) -> None:
    spec = {
        "peft_type": "LORA",
        "r": R,
        "lora_alpha": ALPHA,
        "init_lora_weights": False,
        "target_modules": ["mha"],
    }
    ours = peftdecl.attach(base_model(), spec, backend="torch", seed=4)
    x = inputs()
    with torch.no_grad():
        expected = as_numpy(ours(x))
    ours.save(tmp_path)
    from safetensors.numpy import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    peft_keys = set(peft.get_peft_model_state_dict(peft_wrapped(["mha"])))
    assert set(saved) == peft_keys
    assert saved["base_model.model.mha.lora_B.weight"].shape == (3 * EMBED, R)
    loaded = peft.PeftModel.from_pretrained(base_model(), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(as_numpy(loaded(x)), expected) <= F32_TOL


def test_unmerge_restores_and_disable_gives_the_base(tmp_path: Path) -> None:
    peft_wrapped(["mha"]).save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(base_model(), tmp_path, backend="torch")
    x = inputs()
    with torch.no_grad():
        base = as_numpy(base_model()(x))
        adapted = as_numpy(ours(x))
        with ours.disable_adapters():
            assert rel_err(as_numpy(ours(x)), base) <= 1e-7
        before = ours.base_weight("mha")
        ours.merge()
        assert rel_err(as_numpy(ours(x)), adapted) <= F32_TOL
        ours.unmerge()
        assert rel_err(ours.base_weight("mha"), before) <= 1e-6  # float32 W + ΔW − ΔW
        assert rel_err(as_numpy(ours(x)), adapted) <= F32_TOL
    assert rel_err(adapted, base) > 1e-2  # the adapter changes the output


def test_gradients_are_peft_training_gradients(tmp_path: Path) -> None:
    """float64: PEFT's autograd gradients (out_proj's factors see s, not the 2s of their value) = the torch
    backend's autograd = the NumPy reference's explicit backward."""
    wrapped = peft_wrapped(["mha"], dtype=torch.float64)
    wrapped.save_pretrained(tmp_path)  # float32 file: every side loads these numbers
    wrapped = peft.PeftModel.from_pretrained(base_model(dtype=torch.float64), tmp_path, is_trainable=True)
    ours = peftdecl.load_adapter(
        base_model(dtype=torch.float64), tmp_path, backend="torch", is_trainable=True
    )
    ref = reference(tmp_path)
    x = inputs(torch.float64).requires_grad_(True)
    dy = torch.randn(4, 2, EMBED, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    wrapped.train()
    (wrapped.base_model.model.mha(x, x, x)[0] * dy).sum().backward()
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p.grad for n, p in wrapped.named_parameters()
              if p.grad is not None}  # fmt: skip
    ours.train()
    xt = x.detach().clone().requires_grad_(True)
    (ours.base_model.mha(xt, xt, xt)[0] * dy).sum().backward()
    mine = {k: p.grad for k, p in ours.trainable_parameters().items()}
    _, tape = ref.engine.layer_forward("mha", x.detach().numpy())
    explicit = ref.engine.layer_backward("mha", tape, dy.numpy())
    assert set(theirs) == set(mine) == set(explicit) - {"input"} and len(mine) == 4
    for key, grad in theirs.items():
        assert rel_err(as_numpy(mine[key]), as_numpy(grad)) <= F64_TOL, key
        assert rel_err(explicit[key], as_numpy(grad)) <= F64_TOL, key
    assert rel_err(explicit["input"], as_numpy(xt.grad)) <= F64_TOL


def test_reference_gradients_are_finite_differences(tmp_path: Path) -> None:
    """Central differences of the reference's output: the input and in_proj's factors equal its backward;
    out_proj's factors are twice it (their value carries 2s, their PEFT gradient s)."""
    peft_wrapped(["mha"], dtype=torch.float64).save_pretrained(tmp_path)
    ref = reference(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, EMBED))
    dy = rng.normal(size=(3, 2, EMBED))
    _, tape = ref.engine.layer_forward("mha", x)
    grads = ref.engine.layer_backward("mha", tape, dy)
    params = ref.trainable_parameters()
    h = 1e-6

    def numeric(array: np.ndarray) -> np.ndarray:
        out = np.zeros_like(array)
        for i in np.ndindex(array.shape):
            keep = array[i]
            array[i] = keep + h
            up = float(np.sum(ref("mha", x) * dy))
            array[i] = keep - h
            down = float(np.sum(ref("mha", x) * dy))
            array[i] = keep
            out[i] = (up - down) / (2 * h)
        return out

    for key, array in params.items():
        factor = 2.0 if ".out_proj." in key else 1.0
        assert rel_err(numeric(array), factor * grads[key]) <= FD_TOL, key
    assert rel_err(numeric(x), grads["input"]) <= FD_TOL


def test_wrapped_attention_keeps_the_base_attributes_and_runs_in_a_transformer_layer() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(EMBED, HEADS, dim_feedforward=16, dropout=0.0).eval()
    x = inputs()
    spec = {"peft_type": "LORA", "r": 2, "target_modules": ["self_attn"]}  # B = 0: the layer's own output
    with torch.no_grad():
        expected = layer(x)
        ours = peftdecl.attach(layer, spec, backend="torch")
        attention = ours.base_model.self_attn
        assert (attention.embed_dim, attention.num_heads, attention.batch_first) == (EMBED, HEADS, False)
        assert attention._qkv_same_embed_dim and (attention.in_features, attention.out_features) == (
            EMBED,
            3 * EMBED,
        )
        assert type(attention.get_base_layer()) is nn.MultiheadAttention
        assert rel_err(as_numpy(ours(x)), as_numpy(expected)) <= F32_TOL


def test_refusals_name_the_field() -> None:
    # DoRA does not adapt MultiheadAttention (PEFT refuses it too)
    with pytest.raises(TargetError, match="layers only as dora"):
        peftdecl.attach(base_model(), {"peft_type": "LORA", "target_modules": ["mha"], "use_dora": True})
    with pytest.raises(SpecError, match=r"\$\.bias: mha is an nn.MultiheadAttention"):
        peftdecl.attach(base_model(), {"peft_type": "LORA", "target_modules": ["mha"], "bias": "all"})
    with pytest.raises(SpecError, match=r"\$\.lora_bias"):
        peftdecl.attach(base_model(), {"peft_type": "LORA", "target_modules": ["mha"], "lora_bias": True})
    with pytest.raises(SpecError, match=r"\$\.init_lora_weights"):
        peftdecl.attach(
            base_model(), {"peft_type": "LORA", "target_modules": ["mha"], "init_lora_weights": "olora"}
        )
    with pytest.raises(TargetError, match=r"mha\.out_proj inside the MultiheadAttention mha"):
        peftdecl.attach(base_model(), {"peft_type": "LORA", "target_modules": ["mha", "out_proj"]})
    torch.manual_seed(0)
    separate = Attention(kdim=4)  # separate q/k/v weights: PEFT refuses it too
    with pytest.raises(TargetError, match="MultiheadAttention whose query, key and value share embed_dim"):
        peftdecl.attach(separate, {"peft_type": "LORA", "target_modules": ["mha"]}, backend="torch")


def test_mixed_adapter_batches_are_refused(tmp_path: Path) -> None:
    peft_wrapped(["mha"]).save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(base_model(), tmp_path, backend="torch")
    with pytest.raises(PeftdeclError, match="mixed"):
        ours(inputs(), adapter_names=["default", "__base__"] * 2)


def test_mlx_does_not_claim_it() -> None:
    mlx = peftdecl.backends().get("mlx")
    if mlx is None:
        pytest.skip("MLX is not installed")
    assert mlx.capabilities.why_not("lora_mha", "mha") is not None


def test_two_active_adapters_add_their_updates_as_in_peft(tmp_path: Path) -> None:
    """PEFT merges every active adapter into the weights before the attention: W + ΔW_a + ΔW_b."""
    wrapped = peft_wrapped(["mha"])
    wrapped.add_adapter("other", peft.LoraConfig(target_modules=["mha"], r=2, init_lora_weights=False))
    wrapped.base_model.set_adapter(["default", "other"])
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if ".other." in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    x = inputs()
    with torch.no_grad():
        expected = as_numpy(wrapped(x))
    wrapped.save_pretrained(tmp_path)
    for backend in ("torch", "numpy"):
        if backend == "torch":
            ours = peftdecl.load_adapter(base_model(), tmp_path, backend="torch")
        else:
            ours = reference(tmp_path)
        ours.load_adapter(tmp_path / "other", "other")
        ours.set_adapter(["default", "other"])
        with torch.no_grad():
            y = as_numpy(ours(x)) if backend == "torch" else ours("mha", x.double().numpy())
        if backend == "numpy":
            y = y @ ours.base_weight("lin0").T + as_numpy(wrapped.base_model.model.lin0.bias)
        assert rel_err(y, expected) <= F32_TOL, backend


def test_two_active_adapters_train_like_the_reference(tmp_path: Path) -> None:
    """float64: with both adapters running, the torch backend's autograd = the reference's composed backward."""
    spec = {
        "peft_type": "LORA",
        "r": R,
        "lora_alpha": ALPHA,
        "init_lora_weights": False,
        "target_modules": ["mha"],
    }
    ours = peftdecl.attach(base_model(dtype=torch.float64), spec, backend="torch", seed=4)
    ours.add_adapter("other", {**spec, "r": 2}, seed=5)
    ours.save(tmp_path)
    ref = reference(tmp_path)
    ref.load_adapter(tmp_path / "other", "other", is_trainable=True)
    ours = peftdecl.load_adapter(
        base_model(dtype=torch.float64), tmp_path, backend="torch", is_trainable=True
    )
    ours.load_adapter(tmp_path / "other", "other", is_trainable=True)
    for model in (ours, ref):
        model.set_adapter(["default", "other"])
    x = inputs(torch.float64).requires_grad_(True)
    dy = torch.randn(4, 2, EMBED, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ours.train()
    (ours.base_model.mha(x, x, x)[0] * dy).sum().backward()
    _, tape = ref.engine.layer_forward("mha", x.detach().numpy())
    explicit = ref.engine.layer_backward("mha", tape, dy.numpy())
    mine = {k: p.grad for k, p in ours.trainable_parameters().items()}
    assert set(mine) == set(explicit) - {"input"} and len(mine) == 8
    for key, grad in mine.items():
        assert rel_err(explicit[key], as_numpy(grad)) <= F64_TOL, key
    assert rel_err(explicit["input"], as_numpy(x.grad)) <= F64_TOL


def test_lora_dropout_does_not_act_on_attention_in_training(tmp_path: Path) -> None:
    """PEFT merges the weights around the attention call, so lora_dropout never drops anything there."""
    wrapped = peft_wrapped(["mha"], lora_dropout=0.5).train()
    x = inputs()
    with torch.no_grad():
        expected = as_numpy(wrapped(x))
    wrapped.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(base_model(), tmp_path, backend="torch", is_trainable=True)
    ours.train()
    with torch.no_grad():
        assert rel_err(as_numpy(ours(x)), expected) <= F32_TOL


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_initial_b_is_zero_like_peft(init: Any) -> None:
    """PEFT's deterministic part of the initialisation: both B factors start at zero, so the output is the base's
    (A is random on both sides; its shape and spread are the layout's, tests/test_numpy_lora.py)."""
    spec = {"peft_type": "LORA", "r": R, "target_modules": ["mha"], "init_lora_weights": init}
    ours = peftdecl.attach(base_model(), spec, backend="torch", seed=1)
    theirs = peft.get_peft_model(
        base_model(), peft.LoraConfig(target_modules=["mha"], r=R, init_lora_weights=init)
    )
    expected = {
        k.replace("base_model.model.", ""): v for k, v in peft.get_peft_model_state_dict(theirs).items()
    }
    mine = ours.state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    for key in ("mha.lora_B.weight", "mha.base_layer.out_proj.lora_B.weight"):
        assert not mine[key].any() and not expected[key].any()
    x = inputs()
    with torch.no_grad():
        assert rel_err(as_numpy(ours(x)), as_numpy(base_model()(x))) <= 1e-7


def test_reference_takes_unbatched_input_as_torch_does(tmp_path: Path) -> None:
    peft_wrapped(["mha"], dtype=torch.float64).save_pretrained(tmp_path)
    ref = reference(tmp_path)
    ours = peftdecl.load_adapter(base_model(dtype=torch.float64), tmp_path, backend="torch")
    x = inputs(torch.float64)[:, 0]  # [L, E]
    with torch.no_grad():
        expected = as_numpy(ours.base_model.mha(x, x, x)[0])
    assert rel_err(ref("mha", x.numpy()), expected) <= F64_TOL


def test_inspect_reads_a_saved_attention_adapter(tmp_path: Path, capsys: Any) -> None:
    """`peftdecl inspect` on PEFT's folder: the attention module and its out_proj factors, at rank r."""
    from peftdecl.cli import main

    peft_wrapped(["mha"]).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    rows = {
        line.split()[0]: line.split()[1]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("mha")
    }
    assert rows and set(rows.values()) == {str(R)}
