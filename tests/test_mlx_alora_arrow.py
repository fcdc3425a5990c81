"""aLoRA (``alora_invocation_tokens``) and Arrow (``arrow_config``) on the MLX backend.

Expected numbers come from real HF PEFT on the same tiny Llama in torch (PEFT saves the adapters; the MLX model is
``mlx_lm.load`` of the same folder) and from the float64 NumPy reference (one layer, outputs and gradients).
Tolerances: float32 MLX against float32 torch or float64 NumPy, relative ≤ 1e-4 on logits, 1e-5 on one layer.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import rel_err, selected_backends

mx = pytest.importorskip("mlx.core")
if "mlx" not in selected_backends():
    pytest.skip("PEFTDECL_TEST_BACKENDS excludes mlx", allow_module_level=True)

import mlx.nn as nn  # noqa: E402

import peftdecl  # noqa: E402
from peftdecl.alora import invocation_offsets_set  # noqa: E402
from peftdecl.errors import PeftdeclError  # noqa: E402
from tests.mlx_models import assert_vjp_like_reference, twin  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOGIT_TOL = 1e-4  # float32 MLX logits against float32 torch + PEFT
LAYER_TOL = 1e-5  # float32 MLX layer against the float64 reference
INVOCATION = [5, 6]
# row 0: one invocation in the middle; row 1: two (the last counts); row 2: none (the base model's output)
LLAMA_IDS = [[1, 2, 5, 6, 3, 4, 7], [5, 6, 1, 5, 6, 2, 3], [1, 2, 3, 4, 7, 8, 9]]


class OneLinear(nn.Module):
    def __init__(self, fan_in: int = 6, fan_out: int = 5) -> None:
        super().__init__()
        mx.random.seed(0)
        self.m = nn.Linear(fan_in, fan_out)
        mx.eval(self.parameters())

    def __call__(self, x: mx.array) -> mx.array:
        return self.m(x)


def test_alora_layer_equals_the_numpy_reference_with_gradients() -> None:
    """Under given offsets (row 0 adapted from position 2 on, row 1 not at all): output and gradients."""
    spec = {"peft_type": "LORA", "r": 2, "target_modules": ["m"], "alora_invocation_tokens": INVOCATION}
    ours, ref = twin(OneLinear(), spec)
    x = np.random.default_rng(1).standard_normal((2, 4, 6))
    with invocation_offsets_set({tuple(INVOCATION): (2, None)}):
        y_ref, _ = ref.engine.layer_forward("m", x)
        assert_vjp_like_reference(ours, ref, "m", x, LAYER_TOL)
    base = np.array(ours.engine.layer("m").base_layer(mx.array(x, dtype=mx.float32)), np.float64)
    assert rel_err(y_ref[0, 2:], base[0, 2:]) > 1e-2  # adapted from the invocation on ...
    assert rel_err(y_ref[0, :2], base[0, :2]) < 1e-6 and rel_err(y_ref[1], base[1]) < 1e-6  # ... only
    with pytest.raises(PeftdeclError, match="aLoRA adapter cannot be merged"):
        ours.merge()


def test_alora_offsets_follow_each_batch_in_a_compiled_call() -> None:
    """Under mx.compile (as the trainer compiles its step) each batch's invocation is found anew, on the device."""
    from tests.mlx_models import tiny_llama

    spec = {
        "peft_type": "LORA",
        "r": 2,
        "target_modules": ["q_proj", "v_proj"],
        "alora_invocation_tokens": INVOCATION,
        "init_lora_weights": False,
    }
    base = tiny_llama(num_hidden_layers=1)
    plain = {
        k: np.array(v)
        for k, v in (("a", base(mx.array([[1, 5, 6, 3]]))), ("b", base(mx.array([[5, 6, 1, 3]]))))
    }
    model = peftdecl.attach(base, spec, backend="mlx")
    compiled = mx.compile(lambda ids: model(ids))
    for key, ids in (("a", [[1, 5, 6, 3]]), ("b", [[5, 6, 1, 3]])):
        eager = np.array(model(mx.array(ids)))
        start = ids[0].index(5)
        assert rel_err(eager[:, :start], plain[key][:, :start]) < 1e-6  # before the invocation: the base
        assert rel_err(eager[:, start:], plain[key][:, start:]) > 1e-3  # from it on: adapted
        assert rel_err(np.array(compiled(mx.array(ids))), eager) <= 1e-6  # float32, the same graph


def test_arrow_layer_equals_the_numpy_reference_with_input_gradient() -> None:
    spec = {
        "peft_type": "LORA",
        "r": 2,
        "target_modules": ["m"],
        "arrow_config": {"top_k": 2, "router_temperature": 0.5, "task_adapter_names": ["t0", "t1", "t2"]},
    }
    ours, ref = twin(OneLinear(), spec)
    x = np.random.default_rng(1).standard_normal((2, 4, 6))
    dy = np.random.default_rng(2).standard_normal((2, 4, 5))
    y_ref, tape = ref.engine.layer_forward("m", x)
    d_ref = ref.engine.layer_backward("m", tape, dy)["input"]
    layer = ours.engine.layer("m")
    cotangent = mx.array(dy, dtype=mx.float32)
    _, dx = mx.value_and_grad(lambda xs: mx.sum(layer(xs) * cotangent))(mx.array(x, dtype=mx.float32))
    base = np.array(layer.base_layer(mx.array(x, dtype=mx.float32)), np.float64)
    assert rel_err(y_ref, base) > 1e-2  # the routed experts change the output
    assert rel_err(np.array(layer(mx.array(x, dtype=mx.float32)), np.float64), y_ref) <= LAYER_TOL
    assert rel_err(np.array(dx, np.float64), d_ref) <= LAYER_TOL  # through experts and coefficients
    with pytest.raises(PeftdeclError, match="Arrow router cannot be merged"):
        ours.merge()


# --- the tiny Llama: PEFT in torch against peftdecl on mlx-lm ------------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("mlx_lm")
    from peftdecl.train.tiny_model import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("llama") / "m", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64
    )


def torch_llama(folder: Path) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def mlx_llama(folder: Path) -> nn.Module:
    import mlx_lm

    return mlx_lm.load(str(folder))[0]


def alora_config(
    tokens: list[int] | None, targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")
) -> Any:
    import peft

    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=2,
        target_modules=list(targets),
        alora_invocation_tokens=tokens,
        init_lora_weights=False,  # random A and B: the adapter changes the output where it acts
    )


def test_alora_forward_and_generation_equal_peft(llama_folder: Path, tmp_path: Path) -> None:
    import peft
    import torch

    from peftdecl_mlx.model_io import generate

    base = torch_llama(llama_folder)
    theirs = peft.get_peft_model(copy.deepcopy(base), alora_config(INVOCATION)).eval()
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(mlx_llama(llama_folder), tmp_path, backend="mlx")
    ids = torch.tensor(LLAMA_IDS)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits.numpy()
        plain = base(input_ids=ids).logits.numpy()
    assert rel_err(expected[:2, 2:], plain[:2, 2:]) > 1e-2 and np.array_equal(expected[2], plain[2])
    assert rel_err(np.array(ours(mx.array(LLAMA_IDS))), expected) <= LOGIT_TOL
    # step by step with a KV cache: every new token is adapted where the prompt holds the invocation
    for row in LLAMA_IDS[0], LLAMA_IDS[2]:
        with torch.no_grad():
            wanted = theirs.generate(input_ids=torch.tensor([row]), max_new_tokens=4, do_sample=False)
        assert generate(ours, row, 4, eos=None) == wanted[0, len(row) :].tolist()


def test_alora_cached_steps_equal_the_uncached_forward(llama_folder: Path, tmp_path: Path) -> None:
    """A generated token's logits (cached call of one token) equal PEFT's full forward over prompt + token."""
    import peft
    import torch
    from mlx_lm.models.cache import make_prompt_cache

    theirs = peft.get_peft_model(torch_llama(llama_folder), alora_config(INVOCATION)).eval()
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(mlx_llama(llama_folder), tmp_path, backend="mlx")
    prompt, follow = LLAMA_IDS[0], [9, 4]
    cache = make_prompt_cache(ours.base_model)
    steps = [np.array(ours(mx.array([prompt]), cache=cache))[0]]
    steps += [np.array(ours(mx.array([[t]]), cache=cache))[0] for t in follow]
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor([prompt + follow])).logits.numpy()[0]
    assert rel_err(np.concatenate(steps), expected) <= LOGIT_TOL


def test_alora_in_a_mixed_batch_equals_peft(llama_folder: Path, tmp_path: Path) -> None:
    import peft
    import torch

    targets = ("q_proj", "v_proj")
    theirs = peft.get_peft_model(
        torch_llama(llama_folder), alora_config(INVOCATION, targets), adapter_name="inv"
    )
    theirs.add_adapter("seven", alora_config([7], targets))
    theirs.add_adapter("plain", alora_config(None, targets))
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(mlx_llama(llama_folder), tmp_path, backend="mlx", name="inv")
    for name in ("seven", "plain"):
        ours.load_adapter(tmp_path / name, name)
    ids = [*LLAMA_IDS, [1, 7, 3, 5, 6, 8, 9]]
    names = ["inv", "seven", "plain", "seven"]  # row 1 has no 7: "seven" does not act there; row 3 has
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor(ids), adapter_names=names).logits.numpy()
    assert rel_err(np.array(ours(mx.array(ids), adapter_names=names)), expected) <= LOGIT_TOL


@pytest.fixture(scope="module")
def llama_experts(llama_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Five rank-2 LoRA experts of different lora_alpha on q_proj and v_proj, saved by PEFT."""
    import peft
    import torch

    torch.manual_seed(0)
    base = torch_llama(llama_folder)
    folder = tmp_path_factory.mktemp("experts")
    paths = []
    for i in range(5):
        cfg = peft.LoraConfig(
            r=2, lora_alpha=4 + i, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(folder / f"e{i}")
        paths.append(str(folder / f"e{i}"))
    return paths


@pytest.mark.parametrize("gks", [False, True])
def test_create_arrow_model_on_mlx_lm_equals_peft(
    llama_folder: Path, llama_experts: list[str], gks: bool
) -> None:
    import peft
    import torch
    from peft.tuners.lora.arrow import create_arrow_model as peft_create_arrow_model

    tasks, general = (llama_experts[:3], llama_experts[3:]) if gks else (llama_experts, None)
    # with rng_seed both iterate PEFT's 15 power steps from the same torch start vector
    options = {"top_k": 2, "router_temperature": 0.7, "use_gks": gks, "rng_seed": 1}
    base = torch_llama(llama_folder)
    theirs = peft_create_arrow_model(
        copy.deepcopy(base), tasks, peft.ArrowConfig(**options), general_adapter_paths=general
    ).eval()
    ours = peftdecl.create_arrow_model(mlx_llama(llama_folder), tasks, options, general, backend="mlx")
    assert ours.active_adapters == ["arrow_router"]
    ids = torch.tensor(LLAMA_IDS)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits.numpy()
        plain = base(input_ids=ids).logits.numpy()
    assert rel_err(expected, plain) > 1e-2  # the routed experts change the output
    assert rel_err(np.array(ours(mx.array(LLAMA_IDS))), expected) <= LOGIT_TOL


def test_arrow_start_vector_is_torch_s_draw_through_the_backend_and_numpy_s_without(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The core resolves PEFT's start vector by name (peftdecl.arrow never imports torch itself)."""
    torch = pytest.importorskip("torch")
    from peftdecl import arrow

    drawn = torch.randn(7, generator=torch.Generator().manual_seed(3)).numpy()
    assert np.array_equal(arrow._start_vector(3, 7), drawn)
    monkeypatch.setattr(arrow, "TORCH_START", "peftdecl_no_such_module:arrow_start_vector")
    fallback = np.random.default_rng(3).standard_normal(7).astype(np.float32)
    assert np.array_equal(arrow._start_vector(3, 7), fallback)
    source = Path(arrow.__file__).read_text()
    assert "import torch" not in source
