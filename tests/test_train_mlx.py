"""The MLX training runtime and model I/O on a tiny Llama folder (hidden 64, 2 layers) built locally.

Expected numbers come from independent code: mlx-lm's ``default_loss``, ``torch.optim`` fed the same gradients
(computed by MLX autograd of mlx-lm's loss), the uncompiled path, a plain greedy loop without a KV cache, the
float64 NumPy AdaLoRA regulariser, and the merged folder loaded by ``mlx_lm.load`` and transformers.

Tolerances (float32): relative error ≤ 1e-5 for losses, gradient norms and parameters after optimizer steps,
and for merged-model logits; compiled and uncompiled steps agree to ≤ 1e-5 (they are bitwise equal on CPU).
The first run on a machine also JIT-compiles MLX's CPU kernels (cached under the temp folder afterwards).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from tests.conftest import rel_err, selected_backends  # noqa: E402

if "mlx" not in selected_backends():
    pytest.skip("PEFTDECL_TEST_BACKENDS excludes mlx", allow_module_level=True)

import peftdecl  # noqa: E402
from peftdecl.backend import get_backend  # noqa: E402
from peftdecl.errors import PeftdeclError  # noqa: E402
from peftdecl.model import AdaptedModel  # noqa: E402
from peftdecl.train.config import DataConfig, TrainFile, TrainingConfig  # noqa: E402
from peftdecl.train.runtime import MicroBatch  # noqa: E402
from peftdecl.train.tiny_model import build_tiny_llama  # noqa: E402
from peftdecl_mlx.training import MlxTrainingRuntime  # noqa: E402

TOL = 1e-5
INVOCATION = 3  # a token id batch() never draws: aLoRA acts from where the test puts it
TARGETS = ["q_proj", "v_proj"]
LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": TARGETS}
ADALORA = {
    "peft_type": "ADALORA", "init_r": 4, "target_r": 2, "total_step": 5, "tinit": 1, "tfinal": 1, "deltaT": 1,
    "target_modules": TARGETS,
}  # fmt: skip
KINDS = {
    "lora": {**LORA, "init_lora_weights": True, "lora_dropout": 0.1},
    "dora": {**LORA, "init_lora_weights": True, "lora_dropout": 0.1, "use_dora": True},
    "adalora": {**ADALORA, "total_step": 3, "tinit": 0, "lora_dropout": 0.1},
    "ia3": {
        "peft_type": "IA3",
        "target_modules": ["k_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
    },
    "loha": {"peft_type": "LOHA", "r": 2, "alpha": 4, "rank_dropout": 0.1, "target_modules": TARGETS},
    "lokr": {"peft_type": "LOKR", "r": 2, "alpha": 4, "rank_dropout": 0.1, "target_modules": TARGETS},
    "oft": {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": TARGETS},
    "boft": {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": TARGETS},
    "vera": {"peft_type": "VERA", "r": 4, "vera_dropout": 0.1, "target_modules": TARGETS},
    "prefix_tuning": {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3},
    "prompt_tuning": {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3},
    "velora": {**LORA, "velora_config": {"num_groups": 4}},
    "kasa": {**LORA, "kasa_config": {}},
    "bdlora": {
        **LORA,
        "use_bdlora": {"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["v_proj"], "nblocks": 2},
    },
    "trainable_tokens": {"peft_type": "TRAINABLE_TOKENS", "token_indices": [1, 2, 5]},
    "mica": {**LORA, "init_lora_weights": "mica"},
    "monteclora": {**LORA, "monteclora_config": {"num_samples": 2, "sample_scaler": 0.5}},
    "alora": {**LORA, "alora_invocation_tokens": [INVOCATION]},
}
"""A small spec per kind the MLX backend supports on mlx-lm models (dropout on where the kind has it)."""
BUILT_FROM_EXPERTS = {
    "arrow": "an Arrow router is built from expert adapters (tests/test_mlx_alora_arrow.py)"
}
"""Kinds the MLX backend runs that one spec cannot attach alone, and where they are tested instead."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=64, layers=2)


def batch(seed: int, rows: int = 4, length: int = 17) -> MicroBatch:
    """Right-padded random ids; rows of different lengths and prompt offsets."""
    rng = np.random.default_rng(seed)
    lengths = np.array([length - 3 * (i % 3) for i in range(rows)], np.int32)
    ids = rng.integers(4, 90, size=(rows, length)).astype(np.int32)
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return MicroBatch(ids, lengths, np.array([(2 * i) % 5 for i in range(rows)], np.int32))


def split(mb: MicroBatch) -> list[MicroBatch]:
    half = mb.input_ids.shape[0] // 2
    return [
        MicroBatch(mb.input_ids[s], mb.lengths[s], mb.offsets[s]) for s in (slice(0, half), slice(half, None))
    ]


def adapted(folder: Path, spec: dict, arrays: dict | None = None) -> AdaptedModel:
    backend = get_backend("mlx")
    base, _ = backend.load_pretrained(folder, device="auto", dtype="float32")  # type: ignore[attr-defined]
    model = AdaptedModel.create(backend, base, {"seed": 0})
    model.add_adapter("default", spec, seed=0, activate=True, arrays=arrays)
    return model.train()


def runtime(model: AdaptedModel, compile: bool = True, **training: object) -> MlxTrainingRuntime:
    config = TrainFile(
        model="unused", adapter={}, data=DataConfig(train="unused"), output_dir="unused",
        training=TrainingConfig(**{"learning_rate": 1e-2, **training}),  # type: ignore[arg-type]
    )  # fmt: skip
    return MlxTrainingRuntime(model, None, config, compile=compile)  # type: ignore[arg-type]


def step(
    rt: MlxTrainingRuntime, micro: list[MicroBatch], index: int, lr: float = 1e-2
) -> tuple[float, float]:
    """One optimizer step over ``micro`` as the loop runs it: (mean loss, gradient norm)."""
    count = sum(mb.token_count() for mb in micro)
    total = sum(rt.forward_backward(mb, 1.0 / count, 1.0 / len(micro)) for mb in micro)
    return total / count, rt.optimizer_step(lr, index)


def params(model: AdaptedModel) -> dict[str, np.ndarray]:
    return model.state_dict()


def assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: float = TOL) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert rel_err(a[key], b[key]) <= tol, key


def mlx_lm_lengths(mb: MicroBatch) -> object:
    """mlx-lm's (offset, length) rows, its mask ``offset ≤ t+1 ≤ length`` made ours (``t+1 < length``)."""
    return mx.array(np.stack([mb.offsets, mb.lengths - 1], axis=1))


# -- the loss and the optimizer ------------------------------------------------------------------------------
def test_loss_equals_mlx_lm_default_loss(folder: Path) -> None:
    from mlx_lm.tuner.trainer import default_loss

    model = adapted(folder, LORA)
    rt = runtime(model)
    mb = batch(0)
    ours = rt.forward_backward(mb, 1.0, 1.0)
    mean, count = default_loss(model.engine.model, mx.array(mb.input_ids), mlx_lm_lengths(mb))
    assert int(count.item()) == mb.token_count()
    assert rel_err(ours, float(mean.item()) * mb.token_count()) <= TOL
    assert rel_err(rt.eval_loss(mb), float(mean.item()) * mb.token_count()) <= TOL
    assert model.engine.model.training  # eval_loss restores training mode


def reference_grads(model: AdaptedModel, mb: MicroBatch) -> dict[str, np.ndarray]:
    """∂ mean counted cross-entropy (mlx-lm's default_loss) by MLX autograd over the flat trainable mapping."""
    from mlx_lm.tuner.trainer import default_loss

    engine = model.engine
    start = engine.trainable_parameters(("default",))

    def loss(p: dict) -> object:
        engine.update_parameters(p)
        return default_loss(engine.model, mx.array(mb.input_ids), mlx_lm_lengths(mb))[0]

    grads = mx.grad(loss)(start)
    engine.update_parameters(start)
    return {k: np.array(v) for k, v in grads.items()}


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_optimizer_steps_equal_torch_on_the_same_gradients(folder: Path, optim: str) -> None:
    torch = pytest.importorskip("torch")
    settings = dict(optim=optim, weight_decay=0.1, max_grad_norm=0.05, adam_epsilon=1e-6, adam_beta2=0.99)
    model = adapted(folder, LORA)
    rt = runtime(model, **settings)
    theirs = {k: torch.tensor(v, requires_grad=True) for k, v in params(model).items()}
    tensors = list(theirs.values())
    optimizer = (
        torch.optim.AdamW(tensors, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
        if optim == "adamw"
        else torch.optim.SGD(tensors, lr=1e-2, weight_decay=0.1)
    )
    for index in range(3):  # the bias corrections differ at every step
        mb = batch(index)
        grads = reference_grads(model, mb)
        _, norm = step(rt, [mb], index)
        for key, tensor in theirs.items():
            tensor.grad = torch.tensor(grads[key])
        expected_norm = float(torch.nn.utils.clip_grad_norm_(tensors, 0.05))
        optimizer.step()
        assert rel_err(norm, expected_norm) <= TOL
        assert_close(params(model), {k: v.detach().numpy() for k, v in theirs.items()})


# -- compilation, accumulation, resume ----------------------------------------------------------------------
def test_compiled_step_equals_uncompiled_and_draws_new_dropout_masks(folder: Path) -> None:
    spec = {**LORA, "lora_dropout": 0.3}
    runs = {}
    for compiled in (True, False):
        model = adapted(folder, spec)
        rt = runtime(model, compile=compiled)
        assert rt.compiled is compiled
        losses = [step(rt, [batch(0)], 0)[0]]
        mb = batch(1)
        keys = [model.engine.get_rng_state()["key"]]
        for _ in range(2):  # the same batch and weights twice: only the dropout masks differ
            losses.append(rt.forward_backward(mb, 1.0, 0.5))
            keys.append(model.engine.get_rng_state()["key"])
        rt.optimizer_step(1e-2, 1)
        assert losses[1] != losses[2]
        assert not np.array_equal(keys[0], keys[1]) and not np.array_equal(keys[1], keys[2])
        runs[compiled] = (losses, params(model), keys[-1])
    assert rel_err(runs[True][0], runs[False][0]) <= TOL
    assert_close(runs[True][1], runs[False][1])
    assert np.array_equal(runs[True][2], runs[False][2])


@pytest.mark.parametrize("spec", [LORA, ADALORA], ids=["lora", "adalora"])
def test_two_micro_batches_equal_one_batch(folder: Path, spec: dict) -> None:
    results = []
    for micro in ([batch(3)], split(batch(3))):
        model = adapted(folder, spec)
        rt = runtime(model)
        results.append((*step(rt, micro, 2), params(model)))
    (loss_a, norm_a, params_a), (loss_b, norm_b, params_b) = results
    assert rel_err(loss_b, loss_a) <= TOL and rel_err(norm_b, norm_a) <= TOL
    assert_close(params_b, params_a)


def roundtrip(tensors: dict[str, np.ndarray], meta: dict, folder: Path) -> tuple[dict, dict]:
    """The state through a safetensors file and JSON, as a checkpoint stores it."""
    from safetensors.numpy import load_file, save_file

    save_file(tensors, str(folder / "state.safetensors"))
    return load_file(str(folder / "state.safetensors")), json.loads(json.dumps(meta))


@pytest.mark.parametrize(
    "spec", [{**LORA, "lora_dropout": 0.2}, {**ADALORA, "lora_dropout": 0.2}], ids=["lora", "adalora"]
)
def test_resume_continues_like_an_uninterrupted_run(folder: Path, tmp_path: Path, spec: dict) -> None:
    batches, split_at, total = [batch(10 + i) for i in range(5)], 2, 5
    model = adapted(folder, spec)
    rt = runtime(model)
    straight = [step(rt, [mb], i)[0] for i, mb in enumerate(batches)]

    first = adapted(folder, spec)
    rt = runtime(first)
    resumed = [step(rt, [mb], i)[0] for i, mb in enumerate(batches[:split_at])]
    tensors, meta = roundtrip(*rt.state(), tmp_path)
    second = adapted(folder, first.spec().to_dict(), arrays=params(first))
    rt = runtime(second)
    rt.load_state(tensors, meta)
    resumed += [step(rt, [batches[i]], i)[0] for i in range(split_at, total)]
    assert rel_err(resumed, straight) <= TOL
    assert_close(params(second), params(model))
    assert second.spec().to_dict() == model.spec().to_dict()  # AdaLoRA: the same final rank_pattern


def test_load_state_refuses_another_backends_state(folder: Path) -> None:
    rt = runtime(adapted(folder, LORA))
    tensors, meta = rt.state()
    with pytest.raises(PeftdeclError, match="torch"):
        rt.load_state(tensors, {**meta, "backend": "torch"})


# -- every kind, AdaLoRA, checkpointing ------------------------------------------------------------------------
def test_the_kind_table_covers_the_backend() -> None:
    assert set(KINDS) | set(BUILT_FROM_EXPERTS) == set(peftdecl.backends()["mlx"].capabilities.kinds)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_trains_compiled_like_uncompiled(folder: Path, kind: str) -> None:
    runs = []
    for compiled in (True, False):
        model = adapted(folder, KINDS[kind])
        rt = runtime(model, compile=compiled)
        before = params(model)
        batches = [batch(20 + i, rows=2) for i in range(3)]
        for mb in batches:
            mb.input_ids[:, 4] = INVOCATION  # only aLoRA reads it; the others see one more ordinary token
        losses = [step(rt, [mb], i)[0] for i, mb in enumerate(batches)]
        runs.append((losses, params(model)))
    (losses, after), (eager_losses, eager_after) = runs
    trainable = model.trainable_parameters()
    assert not [k for k in trainable if np.array_equal(before[k], after[k])], "unchanged tensors"
    assert rel_err(losses, eager_losses) <= TOL
    assert_close(after, eager_after)


def as_lists(pattern: dict) -> dict[str, list[bool]]:
    return {k: [bool(b) for b in v] for k, v in pattern.items()}


def test_adalora_allocates_down_to_the_target_budget(folder: Path) -> None:
    model = adapted(folder, ADALORA)
    rt = runtime(model)
    for i in range(5):
        step(rt, [batch(30 + i)], i)
    pattern = model.spec().rank_pattern
    assert pattern is not None and as_lists(pattern) == rt.rank_pattern["default"]
    assert sum(map(sum, pattern.values())) == 2 * len(model.plan().layers)
    state = params(model)
    for module_e, kept in pattern.items():
        values = state[module_e].reshape(len(kept), -1)
        assert np.all(values[~np.array(kept)] == 0.0), module_e


def test_orthogonal_regularizer_equals_the_numpy_reference(folder: Path) -> None:
    from peftdecl_mlx.training_ops import orthogonal_regularizer
    from peftdecl_numpy.kinds.adalora import orthogonal_regularizer as reference

    model = adapted(folder, ADALORA)
    ours = orthogonal_regularizer(model.plan(), model.trainable_parameters())
    expected, _ = reference(model.plan(), {k: v.astype(np.float64) for k, v in params(model).items()})
    assert rel_err(float(ours.item()), expected) <= TOL


@pytest.mark.parametrize("kind", ["lora", "prompt_tuning", "prefix_tuning"])
def test_gradient_checkpointing_gives_the_same_steps(folder: Path, kind: str) -> None:
    spec = {**LORA, "lora_dropout": 0.3} if kind == "lora" else KINDS[kind]
    runs = []
    for checkpointing in (True, False):
        model = adapted(folder, spec)
        rt = runtime(model, gradient_checkpointing=checkpointing)
        losses = [step(rt, [batch(40 + i)], i)[0] for i in range(2)]
        runs.append((losses, params(model), model.engine.get_rng_state()["key"]))
        blocks = model.engine.model.layers
        rt.close()
        assert all(type(b).__name__ == "TransformerBlock" for b in blocks)
    assert rel_err(runs[0][0], runs[1][0]) <= TOL
    assert_close(runs[0][1], runs[1][1])
    assert np.array_equal(runs[0][2], runs[1][2])


def test_host_drawn_module_dropout_trains_uncompiled(folder: Path) -> None:
    model = adapted(folder, {**KINDS["loha"], "module_dropout": 0.5})
    with pytest.warns(UserWarning, match="uncompiled"):
        rt = runtime(model)
    assert not rt.compiled
    assert np.isfinite(step(rt, [batch(0)], 0)[0])


# -- model I/O -----------------------------------------------------------------------------------------------
def test_load_pretrained_tokenises_like_transformers_and_mlx_lm(folder: Path) -> None:
    from mlx_lm import load
    from transformers import AutoTokenizer

    backend = get_backend("mlx")
    model, tokenizer = backend.load_pretrained(folder, device="cpu", dtype="bfloat16")  # type: ignore[attr-defined]
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    text = "Hello, world!\n  two spaces"
    expected = AutoTokenizer.from_pretrained(str(folder)).encode(text)
    assert tokenizer.encode(text) == expected == load(str(folder))[1].encode(text)
    assert tokenizer.decode(expected) == text
    with pytest.raises(PeftdeclError, match="cuda"):
        backend.load_pretrained(folder, device="cuda", dtype="float32")  # type: ignore[attr-defined]
    with pytest.raises(PeftdeclError, match="missing"):
        backend.load_pretrained(folder / "missing", device="auto", dtype="float32")  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["lora", "prompt_tuning", "prefix_tuning"])
def test_generate_equals_a_greedy_loop_without_cache(folder: Path, kind: str) -> None:
    from peftdecl_mlx.model_io import generate

    model = adapted(folder, LORA if kind == "lora" else KINDS[kind])
    prompt = [5, 40, 41, 42, 17]
    got = generate(model, prompt, 6, eos=None)
    assert model.engine.model.training  # restored after generating
    model.eval()
    ids = list(prompt)
    for _ in range(6):  # the whole sequence every step: no cache
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    assert got == ids[len(prompt) :]
    eos = got[1]
    assert generate(model, prompt, 6, eos=eos) == got[: got.index(eos) + 1]  # stops at EOS, EOS included


def merged_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    from mlx_lm import load

    merged, _ = load(str(path))
    return np.array(merged(mx.array(ids)))


def test_save_merged_loads_in_mlx_lm_and_transformers(folder: Path, tmp_path: Path) -> None:
    from peftdecl_mlx.model_io import save_merged

    model = adapted(folder, {**LORA, "target_modules": ["q_proj", "v_proj", "down_proj"]}).eval()
    ids = batch(50).input_ids
    expected = np.array(model(mx.array(ids)))
    tokenizer = get_backend("mlx").load_pretrained(folder, device="auto", dtype="float32")[1]  # type: ignore[attr-defined]
    save_merged(model, tokenizer, folder, tmp_path / "merged", None, max_shard_bytes=200_000)
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # several shards
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert rel_err(merged_logits(out, ids), expected) <= TOL
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert rel_err(theirs, expected) <= TOL


def test_save_merged_writes_bfloat16_and_refuses_what_it_cannot_write(folder: Path, tmp_path: Path) -> None:
    from peftdecl_mlx.model_io import save_merged

    tokenizer = get_backend("mlx").load_pretrained(folder, device="auto", dtype="float32")[1]  # type: ignore[attr-defined]
    save_merged(adapted(folder, LORA), tokenizer, folder, tmp_path / "bf16", "bfloat16")
    header = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert header["torch_dtype"] == "bfloat16"
    weights = mx.load(str(tmp_path / "bf16" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    with pytest.raises(PeftdeclError, match="not empty"):
        save_merged(adapted(folder, LORA), tokenizer, folder, tmp_path / "bf16", None)
    with pytest.raises(PeftdeclError, match="prompt_tuning"):
        save_merged(adapted(folder, KINDS["prompt_tuning"]), tokenizer, folder, tmp_path / "p", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]  # no staging folder left behind
