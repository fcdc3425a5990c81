"""The torch backend on a CUDA device: every kind against the float64 NumPy reference, and the model-level checks
against the real HF PEFT running on the same device.

Skipped without a GPU. ``PEFTDECL_TEST_DEVICE=cpu`` runs the same checks on the CPU, which is how the checks
themselves are tested on machines without one. TF32 is switched off for matrix products and convolutions so float32
stays float32; tolerances are the CPU suite's: float32 relative ≤ 1e-5 (forward, gradients, loss, parameters after
a step), float64 ≤ 1e-10, merged float32 weights ≤ 1e-6, half-precision bases ≤ 2e-2 against float64.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import peftdecl
from tests.conftest import rel_err
from tests.hf_models import peft, peft_model, perturb, tiny_llama, torch
from tests.peft_parity import assert_training_step_like_peft
from tests.test_torch_peft import KINDS, ids, peft_trainable, two_peft_loras
from tests.torch_cases import PAIRS, TOL, Holder, available, build

DEVICE = os.environ.get("PEFTDECL_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.peft,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="no CUDA device (PEFTDECL_TEST_DEVICE=cpu runs these checks on the CPU)",
    ),
]
MODEL_TOL = 1e-5
MERGE_TOL = 1e-6


@pytest.fixture(autouse=True)
def _exact_float32():
    """Full float32 products: TF32 (cuDNN's default for convolutions) would round inputs to 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _no_peft_extension_build(monkeypatch):
    """PEFT's BOFT compiles a CUDA extension with ninja on first use (a minute of nvcc on a GPU machine); it only
    builds the block-diagonal rotation, which its fallback builds with torch.block_diag to the same numbers."""
    from peft.tuners.boft import layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", False)


def host(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


@pytest.mark.parametrize("path", ["fused", "composed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("case", "layer"), PAIRS, ids=[f"{c}-{lay}" for c, lay in PAIRS])
def test_kind_on_device_matches_numpy_reference(case: str, layer: str, dtype, path: str, monkeypatch) -> None:
    reason = available(case, layer)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("PEFTDECL_FUSED", str(path == "fused"))  # read by the engine build() creates
    ours, reference, x, xt = build(case, layer, dtype, device=DEVICE)
    params = ours.trainable_parameters()
    assert all(p.device.type == DEVICE for p in params.values())
    tol = TOL[dtype]
    expected, tape = reference.engine.layer_forward("m", x)
    dy = np.random.default_rng(1).normal(size=expected.shape)
    expected_grads = reference.engine.layer_backward("m", tape, dy)
    with torch.no_grad():
        assert rel_err(host(ours(xt)), expected) <= tol
    y = ours(xt)
    assert y.device.type == DEVICE and y.dtype == dtype
    assert rel_err(host(y), expected) <= tol
    y.backward(torch.tensor(dy, dtype=dtype, device=DEVICE))
    for key, param in params.items():
        assert rel_err(host(param.grad), expected_grads[key]) <= tol, key
    if xt.is_floating_point():
        assert rel_err(host(xt.grad), expected_grads["input"]) <= tol

    ours.merge()
    reference.merge()
    merge_tol = 1e-10 if dtype == torch.float64 else MERGE_TOL
    merged = reference.base_weight("m")
    assert rel_err(ours.base_weight("m"), merged) <= merge_tol
    ours.unmerge()
    reference.unmerge()
    restored = reference.base_weight("m")
    # W + ΔW − ΔW rounds relative to the merged weight, which tiny random adapters make larger than W itself
    grown = max(1.0, float(np.linalg.norm(merged) / np.linalg.norm(restored)))
    assert rel_err(ours.base_weight("m"), restored) <= merge_tol * grown


def llama_on_device():
    return tiny_llama().to(DEVICE)


def peft_saved_on_device(kind: str, folder):
    """A PEFT model of ``kind`` on DEVICE with non-trivial adapter weights, saved in ``folder``."""
    wrapped = peft_model(llama_on_device(), KINDS[kind]())
    # PEFT 0.21.2 moves AdaLoRA's ranknum to the base layer's device by storing a plain tensor in a ParameterDict,
    # which wraps it as a new Parameter with requires_grad=True: on a GPU ranknum (init_r, a constant by design,
    # never saved) turns trainable. It is frozen again here so both sides hold PEFT's intended model.
    for name, param in wrapped.named_parameters():
        if ".ranknum." in name:
            param.requires_grad_(False)
    perturb(wrapped)
    wrapped.save_pretrained(folder)
    return wrapped


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_peft_file_on_device_gives_peft_logits_loss_gradients_and_step(kind: str, tmp_path) -> None:
    wrapped = peft_saved_on_device(kind, tmp_path)
    ours = peftdecl.load_adapter(llama_on_device(), tmp_path, is_trainable=True)
    x = ids(seed=1).to(DEVICE)
    with torch.no_grad():
        assert rel_err(host(ours(input_ids=x).logits), host(wrapped(input_ids=x).logits)) <= MODEL_TOL
    assert_training_step_like_peft(wrapped, ours, peft_trainable(wrapped), MODEL_TOL, input_ids=x, labels=x)

    ours.eval()
    wrapped.eval()
    merged_ours, merged_theirs = ours.merge_and_unload(), wrapped.merge_and_unload()
    theirs = merged_theirs.state_dict()
    for key, value in merged_ours.state_dict().items():
        assert value.device.type == DEVICE, key
        # merged after the step: the stepped adapters agree to MODEL_TOL, and so do the weights built from them
        assert rel_err(host(value), host(theirs[key])) <= MODEL_TOL, key


def test_saved_from_device_loads_in_peft_and_generates_like_it(tmp_path) -> None:
    wrapped = peft_saved_on_device("lora", tmp_path / "theirs")
    ours = peftdecl.load_adapter(llama_on_device(), tmp_path / "theirs")
    prompt = ids(batch=2, length=5, seed=3).to(DEVICE)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(
        ours.generate(input_ids=prompt, **settings), wrapped.generate(input_ids=prompt, **settings)
    )
    ours.save(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(llama_on_device(), tmp_path / "ours")
    x = ids(seed=2).to(DEVICE)
    with torch.no_grad():
        assert rel_err(host(loaded(input_ids=x).logits), host(ours(input_ids=x).logits)) <= MODEL_TOL


def test_mixed_batch_on_device_matches_peft(tmp_path) -> None:
    wrapped, ours = two_peft_loras(llama_on_device, tmp_path, other=["q_proj", "o_proj"])
    wrapped.eval()
    names = ["other", "__base__", "default", "other"]
    x = ids(batch=4, seed=4).to(DEVICE)
    with torch.no_grad():
        expected = wrapped(input_ids=x, adapter_names=names).logits
        assert rel_err(host(ours(input_ids=x, adapter_names=names).logits), host(expected)) <= MODEL_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("rows", "tokens"), [(6, 32), (8, 1)], ids=["prefill", "decode"])
def test_mixed_batch_kernels_on_device_match_the_torch_loop(
    rows: int, tokens: int, dtype, monkeypatch
) -> None:
    """LoRA rows of ranks 2/4/8 and base rows in one mixed-batch launch per layer (segmented for prefill,
    gathered for decode) against the torch loop (PEFTDECL_CUDA_KERNELS=0); float32 ≤ 1e-5, bfloat16 ≤ 2e-2."""
    from peftdecl_torch import cuda_kernels
    from tests.test_torch_cuda_mixed import ADAPTED_LAYERS, ROWS, build, ids, logits

    kern = cuda_kernels.kernels()
    if DEVICE != "cuda" or kern is None:
        pytest.skip("needs CuPy and the kernel sources with a CUDA device")
    launches = []
    launch = type(kern).mixed
    monkeypatch.setattr(type(kern), "mixed", lambda self, *a: launches.append(a[3].size) or launch(self, *a))
    model = build()
    model.engine.to(DEVICE)
    model.engine.to(dtype)
    names = (ROWS * 2)[:rows]
    x = ids(rows, tokens).to(DEVICE)
    on = logits(model, x, names)
    assert launches == [rows * tokens] * ADAPTED_LAYERS
    monkeypatch.setenv(cuda_kernels.ENV, "0")
    cuda_kernels.refresh()
    try:
        off = logits(model, x, names)
    finally:
        cuda_kernels.refresh()
    assert len(launches) == ADAPTED_LAYERS
    assert rel_err(host(on), host(off)) <= (MODEL_TOL if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_learning_on_device_matches_peft(kind: str, tmp_path) -> None:
    config = (peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=5
    )
    torch.manual_seed(1234)
    wrapped = peft.get_peft_model(llama_on_device(), config)
    wrapped.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(llama_on_device(), tmp_path)
    x = ids(seed=5).to(DEVICE)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = wrapped(input_ids=x, attention_mask=mask).logits
        assert rel_err(host(ours(input_ids=x, attention_mask=mask).logits), host(expected)) <= MODEL_TOL
    wrapped.eval()
    ours.eval()
    loss_theirs = wrapped(input_ids=x, attention_mask=mask, labels=x).loss
    loss_ours = ours(input_ids=x, attention_mask=mask, labels=x).loss
    assert rel_err(loss_ours.item(), loss_theirs.item()) <= MODEL_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "oft"])
def test_half_precision_base_on_device(kind: str, dtype, tmp_path) -> None:
    peft_saved_on_device(kind, tmp_path)
    ours = peftdecl.load_adapter(llama_on_device().to(dtype), tmp_path, is_trainable=True)
    assert all(
        p.dtype == torch.float32 and p.device.type == DEVICE for p in ours.trainable_parameters().values()
    )
    reference = peftdecl.load_adapter(tiny_llama().double(), tmp_path)  # float64 on the CPU, same file
    x = ids(seed=8)
    with torch.no_grad():
        logits = ours(input_ids=x.to(DEVICE)).logits
        assert logits.dtype == dtype
        assert rel_err(host(logits), host(reference(input_ids=x).logits)) <= 2e-2
    ours.train()
    loss = ours(input_ids=x.to(DEVICE), labels=x.to(DEVICE)).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.trainable_parameters().values())


@pytest.mark.skipif(DEVICE != "cuda", reason="peak device memory is read from the CUDA allocator")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_dora_peak_memory_stays_within_loras_plus_o_out(dtype) -> None:
    from peftdecl_torch.kinds.dora import ROW_SLICE_ELEMENTS

    tokens, d, r = 16384, 1024, 16  # tokens × d is four times the half-precision scratch

    def peak(use_dora: bool) -> int:
        base = Holder(torch.nn.Linear(d, d)).to(DEVICE, dtype)
        spec = {"peft_type": "LORA", "r": r, "target_modules": ["m"], "init_lora_weights": False}
        model = peftdecl.attach(base, {**spec, "use_dora": use_dora}, seed=1)
        x = torch.randn(tokens, d, device=DEVICE, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, d, device=DEVICE, dtype=dtype)
        model(x).backward(dy)  # warm-up: lazily built caches are not part of a step's peak
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model(x).backward(dy)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    lora, dora = peak(False), peak(True)
    # O(out_features): a few vectors of d floats, plus on a half base the backward's fixed-size row-slice scratch
    # (ROW_SLICE_ELEMENTS, whatever the token count); a d×d ΔW or another tokens×d activation would add 4–16 MiB
    scratch = ROW_SLICE_ELEMENTS * dtype.itemsize if dtype != torch.float32 else 0
    assert dora - lora <= 64 * d * 4 + scratch, (lora, dora)


@pytest.mark.parametrize("case", ["dora+dora", "lora+dora", "ia3+ia3", "oft+oft", "boft+boft"])
def test_several_active_adapters_on_device_match_peft(case: str, tmp_path) -> None:
    from tests.test_torch_multi_active import peft_configs, peft_key

    first, second = peft_configs(peft)[case]
    wrapped = peft_model(llama_on_device(), first)
    wrapped.add_adapter("other", second)
    wrapped.base_model.set_adapter(["default", "other"])
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(llama_on_device(), tmp_path)
    ours.load_adapter(tmp_path, "other")
    ours.set_adapter(["default", "other"])
    wrapped.train()
    ours.train()
    x = ids(seed=7).to(DEVICE)
    loss_theirs = wrapped(input_ids=x, labels=x).loss
    loss_ours = ours(input_ids=x, labels=x).loss
    assert rel_err(loss_ours.item(), loss_theirs.item()) <= MODEL_TOL
    loss_theirs.backward()
    loss_ours.backward()
    theirs = {peft_key(n): p for n, p in wrapped.named_parameters() if p.requires_grad}
    params = ours.trainable_parameters()
    assert set(params) == set(theirs)
    for key, param in params.items():
        assert rel_err(host(param.grad), host(theirs[key].grad)) <= MODEL_TOL, key
