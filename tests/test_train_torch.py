"""The torch training runtime on a tiny Llama: one optimizer step against real PEFT + a plain torch AdamW loop
(LoRA, DoRA, AdaLoRA with its regulariser and a pruning update_and_allocate), accumulation against one larger
batch, resume against an uninterrupted run, two-process data parallelism against one process, and every kind
training and saving an adapter that PEFT loads.

Tolerances: PEFT parity ≤ PEFT_TOL = 1e-5 (float32 on both sides, the same math in a different order: PEFT's
loss is transformers' mean cross-entropy over labels ≠ -100, ours Σ masked CE / count); accumulation ≤ 1e-6 (the
same float32 terms summed in two groupings); resume ≤ RESUME_TOL = 1e-6 (the integrator's bound; the runs are
bit-identical on CPU); data parallel ≤ 1e-5 (gradients summed over two processes vs one batch).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if "torch" not in selected_backends():
    pytest.skip("PEFTDECL_TEST_BACKENDS leaves torch out", allow_module_level=True)

from peftdecl.backend import get_backend  # noqa: E402
from peftdecl.model import AdaptedModel  # noqa: E402
from peftdecl.spec import load_spec  # noqa: E402
from peftdecl.train.config import DataConfig, TrainFile, TrainingConfig  # noqa: E402
from peftdecl.train.runtime import MicroBatch  # noqa: E402
from peftdecl.train.tiny_model import build_tiny_llama  # noqa: E402
from peftdecl_torch.kinds.adalora import orthogonal_regularizer  # noqa: E402
from peftdecl_torch.model_io import load_pretrained  # noqa: E402
from peftdecl_torch.training import TorchTrainingRuntime  # noqa: E402

PEFT_TOL = 1e-5  # float32 both sides, summation order differs
ACCUMULATION_TOL = 1e-6  # same float32 terms, two groupings
RESUME_TOL = 1e-6  # the integrator's bound for torch CPU
DDP_TOL = 1e-5  # two processes' gradient sum vs one batch

QV = ["q_proj", "v_proj"]
SPECS: dict[str, dict[str, Any]] = {
    "lora": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": QV},
    "dora": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": QV},
    "adalora": {
        "peft_type": "ADALORA",
        "task_type": "CAUSAL_LM",
        "init_r": 4,
        "target_r": 2,
        "lora_alpha": 8,
        "total_step": 3,
        "target_modules": QV,
    },
    "ia3": {"peft_type": "IA3", "target_modules": [*QV, "down_proj"], "feedforward_modules": ["down_proj"]},
    "loha": {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": QV},
    "lokr": {"peft_type": "LOKR", "r": 4, "alpha": 8, "target_modules": QV},
    "oft": {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": QV},
    "boft": {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": QV},
    "vera": {"peft_type": "VERA", "r": 4, "target_modules": ["q_proj", "o_proj"]},
    "prefix_tuning": {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3},
    "prompt_tuning": {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ["HF_HUB_OFFLINE"] = "1"
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def train_file(**training: Any) -> TrainFile:
    settings = {"learning_rate": 1e-2, "max_grad_norm": 1.0, **training}
    return TrainFile(
        model="unused",
        adapter={},
        data=DataConfig(train="unused"),
        output_dir="unused",
        training=TrainingConfig(**settings),
    )


def adapted(
    folder: Path, spec: dict[str, Any] | Any, seed: int = 0, arrays: Any = None
) -> tuple[AdaptedModel, Any]:
    base, tokenizer = load_pretrained(folder, device="cpu", dtype="float32")
    model = AdaptedModel.create(get_backend("torch"), base, {"seed": seed})
    model.add_adapter("default", spec, seed=seed, activate=True, arrays=arrays)
    model.train()
    return model, tokenizer


def runtime(folder: Path, spec: dict[str, Any], seed: int = 0, **training: Any) -> TorchTrainingRuntime:
    model, tokenizer = adapted(folder, spec, seed)
    return TorchTrainingRuntime(model, tokenizer, train_file(seed=seed, **training))


def make_batch(
    seed: int = 0, lengths: tuple[int, ...] = (12, 9, 7), offsets: tuple[int, ...] = (3, 0, 2)
) -> MicroBatch:
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = rng.integers(4, 100, size=(len(lengths), width)).astype(np.int32)
    for row, n in enumerate(lengths):
        ids[row, n:] = 0
    return MicroBatch(ids, np.asarray(lengths, np.int32), np.asarray(offsets, np.int32))


def perturb(params: dict[str, Any], seed: int = 3, scale: float = 0.1) -> None:
    """Move every adapter tensor off its initial value (zero-initialised ones included), the same way each time."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(params):
            params[key].add_(scale * torch.randn(params[key].shape, generator=gen, dtype=params[key].dtype))


def step(rt: TorchTrainingRuntime, batch: MicroBatch, index: int, lr: float = 1e-2) -> float:
    counted = batch.token_count()
    loss = rt.forward_backward(batch, 1.0 / counted, 1.0) / counted
    rt.optimizer_step(lr, index)
    return loss


def snapshot(params: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy().copy() for k, v in params.items()}


# -- one step against PEFT -------------------------------------------------------------------------------------
def ir_key(peft_name: str) -> str:
    key = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def peft_config(kind: str) -> Any:
    import peft

    if kind == "adalora":
        return peft.AdaLoraConfig(
            task_type="CAUSAL_LM", init_r=4, target_r=2, lora_alpha=8, total_step=4, tinit=0, tfinal=0,
            deltaT=1, target_modules=QV, orth_reg_weight=0.5,
        )  # fmt: skip
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=QV, use_dora=kind == "dora")


ONE_STEP = {
    "lora": SPECS["lora"],
    "dora": SPECS["dora"],
    "adalora": {
        **SPECS["adalora"],
        "total_step": 4,
        "tinit": 0,
        "tfinal": 0,
        "deltaT": 1,
        "orth_reg_weight": 0.5,
    },
}


@pytest.mark.peft
@pytest.mark.parametrize("kind", sorted(ONE_STEP))
def test_one_step_equals_peft_and_torch_adamw(kind: str, folder: Path) -> None:
    peft = pytest.importorskip("peft")
    # AdaLoRA takes the step at index 1, where its cubic budget prunes (budget 11 of 16 triplets)
    index = 1 if kind == "adalora" else 0
    rt = runtime(folder, ONE_STEP[kind], weight_decay=0.01)
    perturb(rt.params)
    base, _ = load_pretrained(folder, device="cpu", dtype="float32")
    wrapped = peft.get_peft_model(base, peft_config(kind))
    wrapped.train()
    theirs = {ir_key(n): p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert sorted(theirs) == sorted(rt.params)
    with torch.no_grad():
        for key, p in theirs.items():
            p.copy_(rt.params[key])
    batch = make_batch()
    ids = torch.from_numpy(batch.input_ids.astype(np.int64))
    labels = ids.clone()
    labels[:, 1:][torch.from_numpy(batch.loss_mask()) == 0] = -100
    labels[:, 0] = -100
    # PEFT: transformers' mean CE over the counted labels (+ AdaLoRA's orthogonality term in AdaLoraModel.forward)
    out = wrapped(input_ids=ids, labels=labels)
    out.loss.backward()
    optimizer = torch.optim.AdamW(list(theirs.values()), lr=1e-2, weight_decay=0.01)
    their_norm = torch.nn.utils.clip_grad_norm_(list(theirs.values()), 1.0)
    their_grads = {k: p.grad.double().numpy().copy() for k, p in theirs.items()}
    optimizer.step()
    if kind == "adalora":
        wrapped.base_model.update_and_allocate(index)
    optimizer.zero_grad()

    counted = batch.token_count()
    total = rt.forward_backward(batch, 1.0 / counted, 1.0)
    loss = total / counted
    if kind == "adalora":
        loss += float(orthogonal_regularizer(rt.plan, rt.params).detach())
    assert rel_err(loss, out.loss.item()) <= PEFT_TOL
    # our gradients before clipping vs PEFT's after: scale PEFT's back by the clip factor it applied
    factor = min(1.0, 1.0 / (float(their_norm) + 1e-6))
    for key, p in rt.params.items():
        assert rel_err(p.grad.double().numpy() * factor, their_grads[key]) <= PEFT_TOL, key
    before = snapshot(rt.params)
    norm = rt.optimizer_step(1e-2, index)
    assert rel_err(norm, float(their_norm)) <= PEFT_TOL
    for key, p in rt.params.items():
        after = p.detach().double().numpy()
        expected = theirs[key].detach().double().numpy()
        assert rel_err(after, expected) <= PEFT_TOL, key
        assert rel_err(after - before[key], expected - before[key]) <= 1e-3, key  # the update itself
        assert p.grad is None
    if kind == "adalora":
        pruned = [k for k, v in theirs.items() if k.endswith("lora_E") and (v == 0).any()]
        assert pruned, "the step was meant to prune"
        for key in pruned:
            assert np.array_equal(rt.params[key].detach().numpy() == 0, theirs[key].detach().numpy() == 0), (
                key
            )


# -- accumulation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_two_micro_batches_equal_one_batch(kind: str, folder: Path) -> None:
    spec = {**SPECS[kind], "total_step": 4} if kind == "adalora" else SPECS[kind]
    first, second = make_batch(0, (12, 9), (3, 0)), make_batch(1, (12, 7), (0, 2))
    both = MicroBatch(
        np.concatenate([first.input_ids, second.input_ids]),
        np.concatenate([first.lengths, second.lengths]),
        np.concatenate([first.offsets, second.offsets]),
    )
    counted = both.token_count()
    split = runtime(folder, spec)
    whole = runtime(folder, spec)
    perturb(split.params)
    perturb(whole.params)
    sums = split.forward_backward(first, 1 / counted, 0.5) + split.forward_backward(second, 1 / counted, 0.5)
    total = whole.forward_backward(both, 1 / counted, 1.0)
    assert rel_err(sums, total) <= ACCUMULATION_TOL
    split.optimizer_step(1e-2, 0)
    whole.optimizer_step(1e-2, 0)
    for key in split.params:
        assert (
            rel_err(split.params[key].detach().numpy(), whole.params[key].detach().numpy())
            <= ACCUMULATION_TOL
        )


@pytest.mark.parametrize("kind", ["loha", "lora", "dora"])
def test_gradient_checkpointing_gives_the_same_gradients(kind: str, folder: Path) -> None:
    plain = runtime(folder, SPECS[kind])
    checkpointed = runtime(folder, SPECS[kind], gradient_checkpointing=True)
    assert checkpointed.model.base_model.is_activation_checkpointing
    batch = make_batch()
    for rt in (plain, checkpointed):
        perturb(rt.params)
        rt.forward_backward(batch, 0.1, 1.0)
    for key, p in plain.params.items():
        # the same float32 operations recomputed: identical up to reordering inside kernels
        assert rel_err(checkpointed.params[key].grad.numpy(), p.grad.numpy()) <= ACCUMULATION_TOL, key


def test_sgd_step_without_clipping(folder: Path) -> None:
    rt = runtime(folder, SPECS["lora"], optim="sgd", weight_decay=0.1, max_grad_norm=0.0)
    perturb(rt.params)
    batch = make_batch()
    rt.forward_backward(batch, 0.1, 1.0)
    before = snapshot(rt.params)
    grads = {k: p.grad.double().numpy().copy() for k, p in rt.params.items()}
    norm = rt.optimizer_step(0.5, 0)
    assert rel_err(norm, np.sqrt(sum((g**2).sum() for g in grads.values()))) <= PEFT_TOL  # float32 vs float64
    for key, p in rt.params.items():  # SGD with L2 decay: θ − lr (g + λ θ), computed here in float64
        expected = before[key] - 0.5 * (grads[key] + 0.1 * before[key])
        assert rel_err(p.detach().double().numpy(), expected) <= PEFT_TOL, key
    assert rt.state()[1]["optim"] == "sgd"
    assert rt.peak_memory() is None  # CPU


# -- resume -----------------------------------------------------------------------------------------------------
RESUME = {
    "lora": {**SPECS["lora"], "lora_dropout": 0.2},
    # total_step 5, tfinal 2: the mask is final at step 3, so a resume at 2 crosses it and one at 4 starts after it
    "adalora": {
        **SPECS["adalora"],
        "lora_dropout": 0.2,
        "total_step": 5,
        "tinit": 0,
        "tfinal": 2,
        "deltaT": 1,
    },
    "prefix_tuning": SPECS["prefix_tuning"],
}


def through_files(tmp: Path, tensors: dict[str, np.ndarray], meta: Any) -> tuple[dict[str, np.ndarray], Any]:
    """The state as a checkpoint holds it: tensors through safetensors, the rest through JSON."""
    from safetensors.numpy import load_file, save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    return load_file(str(tmp / "state.safetensors")), json.loads(json.dumps(meta))


@pytest.mark.parametrize(
    ("kind", "stop"), [("lora", 2), ("adalora", 2), ("adalora", 4), ("prefix_tuning", 2)]
)
def test_resume_continues_like_an_uninterrupted_run(
    kind: str, stop: int, folder: Path, tmp_path: Path
) -> None:
    batches = [make_batch(i) for i in range(5)]
    straight = runtime(folder, RESUME[kind], seed=5, weight_decay=0.01)
    expected = [step(straight, b, i) for i, b in enumerate(batches)]

    first = runtime(folder, RESUME[kind], seed=5, weight_decay=0.01)
    got = [step(first, b, i) for i, b in enumerate(batches[:stop])]
    tensors, meta = through_files(tmp_path, *first.state())
    spec, arrays = first.model.spec().to_dict(), first.model.state_dict()
    first.close()

    def resumed(restore: bool) -> list[float]:
        model, tokenizer = adapted(folder, load_spec(spec), seed=5, arrays=arrays)
        rt = TorchTrainingRuntime(model, tokenizer, train_file(seed=5, weight_decay=0.01))
        if restore:
            rt.load_state(tensors, meta)
        return [step(rt, b, i) for i, b in enumerate(batches) if i >= stop]

    got += resumed(restore=True)
    assert rel_err(np.array(got), np.array(expected)) <= RESUME_TOL
    if kind != "prefix_tuning":  # the test can fail: without the state, moments and dropout masks differ
        assert rel_err(np.array(expected[stop:]), np.array(resumed(restore=False))) > RESUME_TOL
    if kind == "adalora" and stop > 3:  # resumed after the final mask: the checkpoint's spec carries it
        assert spec["rank_pattern"] is not None


# -- data parallel ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DDP_KINDS = ("lora", "prompt_tuning")  # prompt tuning: its table trains outside the base module


def test_two_processes_equal_one_process(folder: Path, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
        str(free_port()), str(root / "tests" / "ddp_worker.py"), str(folder), str(tmp_path), *DDP_KINDS,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    from tests.ddp_worker import GLOBAL_BATCH, SEED, run_step

    for kind in DDP_KINDS:
        rt = runtime(folder, SPECS[kind], seed=SEED)
        loss, _ = run_step(rt, GLOBAL_BATCH)
        saved = np.load(tmp_path / f"{kind}.npz")
        assert rel_err(float(saved["__loss__"]), loss) <= DDP_TOL, kind
        for key, p in rt.params.items():
            assert rel_err(saved[key], p.detach().numpy()) <= DDP_TOL, (kind, key)


# -- every kind -------------------------------------------------------------------------------------------------
def peft_loads_without_warnings(folder: Path, adapter: Path) -> Any:
    import peft

    base, _ = load_pretrained(folder, device="cpu", dtype="float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(base, adapter)
    # AdaLoRA's rank_pattern check prints a known spurious warning (hf_peft.md §2.3); keys must all match
    bad = [
        str(w.message)
        for w in caught
        if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()
    ]
    assert not bad, bad
    return loaded.eval()


@pytest.mark.peft
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_every_kind_trains_and_saves_for_peft(kind: str, folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    rt = runtime(folder, SPECS[kind], learning_rate=2e-2)
    batch = make_batch()
    before_values = snapshot(rt.params)
    before = rt.eval_loss(batch)
    for i in range(3):
        step(rt, batch, i, lr=2e-2)
    after = rt.eval_loss(batch)
    assert after < before, (before, after)
    moved = [k for k, v in snapshot(rt.params).items() if not np.array_equal(v, before_values[k])]
    assert sorted(moved) == sorted(before_values)
    rt.model.save(tmp_path / "adapter")
    loaded = peft_loads_without_warnings(folder, tmp_path / "adapter")
    ids = torch.from_numpy(batch.input_ids.astype(np.int64))
    rt.model.eval()
    with torch.no_grad():
        ours = rt.model(input_ids=ids).logits.double().numpy()
        theirs = loaded(input_ids=ids).logits.double().numpy()
    assert rel_err(ours, theirs) <= PEFT_TOL
