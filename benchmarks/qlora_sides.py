"""One side of ``compare_qlora.py``: the model shapes, the cached model folders, and one training step's peak
memory and time in this process.

A side is ``<who>-<base>``: who trains (``ours`` = peftdecl, ``peft`` = HF PEFT on torch, ``mlx_lm`` = mlx-lm's
tuner on MLX) over which base (``nf4``: transformers' 4-bit NF4 with double quantisation and float32 compute,
loaded through ``BitsAndBytesConfig``; ``float32``; ``bfloat16``; ``affine4``: MLX ``nn.quantize`` at 4 bits,
group 64). Every torch side imports the same modules (torch, transformers, bitsandbytes, peft, peftdecl's torch
backend) before it reads its baseline, so the baselines agree and the peaks compare.

One step = forward + backward of the mean next-token cross-entropy over batch 1 × ``seq`` random token ids, then
an AdamW update (lr 1e-4, no weight decay) of the adapter, LoRA r 16, alpha 32, no dropout, on q/k/v/o/gate/up/down
of every decoder layer, transformers' non-reentrant gradient checkpointing on (torch).

Memory, Linux: after loading (on torch the float tensors are then copied out of the memory-mapped checkpoint, see
``_own_memory``) and ``warmup`` steps (AdamW's state exists by then), free what Python and glibc hold
(``gc.collect``, ``malloc_trim``), write 5 to ``/proc/self/clear_refs`` (the kernel resets the peak resident set,
VmHWM, to the current one), run the measured steps, read VmHWM. On CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``. On MLX: ``mx.get_peak_memory`` after ``mx.reset_peak_memory`` as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLX_KEYS = tuple(f"self_attn.{t}" for t in TARGETS[:4]) + tuple(f"mlp.{t}" for t in TARGETS[4:])
RANK, ALPHA, LEARNING_RATE, SEED = 16, 32, 1.0e-4, 0
TORCH_SIDES = ("ours-nf4", "peft-nf4", "ours-float32", "ours-bfloat16", "peft-float32")
MLX_SIDES = ("ours-affine4", "mlx_lm-affine4")


@dataclass(frozen=True)
class Shape:
    """A Llama shape (``peftdecl.train.tiny_model.llama_config``'s arguments) and the sequence length."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq: int

    def parameters(self) -> int:
        """Weights of the model: embeddings and head (untied), attention and MLP projections, norms."""
        kv = self.hidden // self.heads * self.kv_heads
        block = 2 * self.hidden * self.hidden + 2 * kv * self.hidden + 3 * self.hidden * self.intermediate
        return self.layers * (block + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden

    def describe(self) -> str:
        return (
            f"Llama hidden {self.hidden}, {self.layers} layers, {self.heads} heads ({self.kv_heads} kv), "
            f"MLP {self.intermediate}, vocab {self.vocab}: {self.parameters() / 1e6:.0f} M parameters; "
            f"batch 1 × {self.seq} tokens"
        )


# -- the model folder, written once --------------------------------------------------------------------------
def model_folder(cache: Path, shape: Shape) -> Path:
    """A folder with ``config.json`` and random float32 ``model.safetensors`` of ``shape`` (weights normal, std
    0.02, from ``peftdecl.train.tiny_model``), reused when its config matches; no tokenizer (ids are random)."""
    from peftdecl.train.tiny_model import llama_config, llama_weights

    config = llama_config(
        shape.vocab, shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.intermediate
    )
    folder = cache / (
        f"llama-h{shape.hidden}-l{shape.layers}-a{shape.heads}-kv{shape.kv_heads}-i{shape.intermediate}"
        f"-v{shape.vocab}"
    )
    done = folder / "model.safetensors"
    if done.exists() and json.loads((folder / "config.json").read_text()) == config:
        return folder
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    partial = folder / "model.safetensors.partial"
    save_file(llama_weights(config, SEED), str(partial), metadata={"format": "pt"})
    partial.replace(done)  # a crash while writing leaves no folder that looks complete
    return folder


# -- memory ------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM, RssAnon), or None off Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the kernel, so the resident set before the step
    holds what is live, not what loading left behind."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


@dataclass
class Measured:
    """What one side reports (MiB, seconds)."""

    side: str
    baseline_rss_mib: float | None
    """Resident set after the imports, before the model loads."""
    resident_before_step_mib: float | None
    """Resident set after loading, attaching and the warm-up steps."""
    anonymous_before_step_mib: float | None
    """The part of it not backed by a file (RssAnon): the heap, the weights, the optimizer state."""
    peak_rss_mib: float | None
    """VmHWM over the measured steps (reset just before them)."""
    peak_device_mib: float | None
    step_seconds: list[float]
    cpu_seconds: list[float]
    """This process's CPU time per measured step (all its threads): less moved than wall time by other
    processes on a shared machine, though threads that spin while waiting still count."""
    first_loss: float
    """The loss of the first step (the adapter is still the identity: the base model's loss)."""
    trainable: int
    base_bytes: int
    """Bytes of the base model's parameters and buffers as loaded (quantised weights at their stored size)."""
    notes: str = ""

    def result(self) -> dict[str, Any]:
        found = asdict(self)
        found["median_step_seconds"] = statistics.median(self.step_seconds)
        found["median_cpu_seconds"] = statistics.median(self.cpu_seconds)
        if self.peak_rss_mib is not None and self.baseline_rss_mib is not None:
            found["peak_above_baseline_mib"] = self.peak_rss_mib - self.baseline_rss_mib
        return found


def _timed(step: Any, steps: int, losses: list[float]) -> tuple[list[float], list[float]]:
    """Run ``step`` ``steps`` times, appending its losses; wall and process CPU seconds of each call."""
    wall, cpu = [], []
    for _ in range(steps):
        began, began_cpu = time.perf_counter(), time.process_time()
        losses.append(step())
        wall.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return wall, cpu


# -- torch ---------------------------------------------------------------------------------------------------------
def _torch_imports() -> None:
    """The same modules on every torch side, before the baseline."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import peftdecl  # noqa: F401
    import peftdecl_torch  # noqa: F401


def _load_torch(folder: Path, base: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    options: dict[str, Any] = {"dtype": torch.bfloat16 if base == "bfloat16" else torch.float32}
    if base == "nf4":
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=device, **options)
    model.config.use_cache = False
    return model


def _own_memory(model: Any) -> None:
    """Copy every float parameter and buffer into memory of its own. transformers leaves them as views of the
    memory-mapped checkpoint, whose pages count in the resident set once read: over a 4-bit base the one mapping
    is kept alive by the float embeddings and head, and so are all its pages that quantising read, weights the
    model no longer uses; over a float base only the pages the step touches count. After the copy the mapping is
    gone and every side's resident set holds the weights it uses, once. Quantised weights already own theirs."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if type(tensor) in (torch.nn.Parameter, torch.Tensor):
                tensor.data = tensor.data.clone()


def _base_bytes(model: Any) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_torch_side(side: str, folder: Path, seq: int, steps: int, warmup: int, device: str) -> Measured:
    """Load ``folder`` as ``side`` says, attach LoRA, run ``warmup`` then ``steps`` timed training steps."""
    _torch_imports()
    _release_free_memory()
    baseline = _mib(_status_kib("VmRSS"))
    import torch

    import peftdecl

    who, base = side.split("-", 1)
    torch.manual_seed(SEED)
    model = _load_torch(folder, base, device)
    if device == "cpu":
        _own_memory(model)
    base_bytes = _base_bytes(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if who == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS))
        trained: Any = get_peft_model(model, config)
        params = [p for p in trained.parameters() if p.requires_grad]
    else:
        spec = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0}
        trained = peftdecl.attach(model, spec | {"target_modules": list(TARGETS)}, seed=SEED)
        params = list(trained.trainable_parameters().values())
    trained.train()
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(4, model.config.vocab_size, (1, seq), generator=generator).to(device)

    def step() -> float:
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    cuda = device == "cuda"
    measured = _measured_steps(
        step,
        warmup,
        steps,
        reset_device=torch.cuda.reset_peak_memory_stats if cuda else lambda: None,
        device_peak_mib=lambda: torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    )
    return Measured(
        side=side,
        baseline_rss_mib=baseline,
        **measured,
        trainable=sum(p.numel() for p in params),
        base_bytes=base_bytes,
        notes=f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}",
    )


def _measured_steps(
    step: Callable[[], float],
    warmup: int,
    steps: int,
    *,
    reset_device: Callable[[], object],
    device_peak_mib: Callable[[], float | None],
) -> dict[str, Any]:
    """``warmup`` steps, then ``steps`` timed ones with the process's peak RSS (and the device's) reset first: the
    step fields of :class:`Measured` (resident memory before, peak during, times, the first loss)."""
    losses = [step() for _ in range(warmup)]
    _release_free_memory()
    before, anonymous = _mib(_status_kib("VmRSS")), _mib(_status_kib("RssAnon"))
    reset = _reset_peak_rss()
    reset_device()
    times, cpu = _timed(step, steps, losses)
    return {
        "resident_before_step_mib": before,
        "anonymous_before_step_mib": anonymous,
        "peak_rss_mib": _mib(_status_kib("VmHWM")) if reset else None,
        "peak_device_mib": device_peak_mib(),
        "step_seconds": times,
        "cpu_seconds": cpu,
        "first_loss": losses[0],
    }


# -- MLX -----------------------------------------------------------------------------------------------------------
def run_mlx_side(side: str, folder: Path, seq: int, steps: int, warmup: int) -> Measured:
    """``nn.quantize`` (4 bits, group 64) the model of ``folder``, add LoRA (peftdecl's or mlx-lm's
    ``linear_to_lora_layers``) and time the same compiled step: mlx-lm's ``default_loss`` under
    ``nn.value_and_grad`` and ``optim.AdamW``, compiled over the model's and optimizer's state as mlx-lm's trainer
    compiles it. No gradient checkpointing (the MLX model is small)."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    import peftdecl

    _release_free_memory()
    baseline = _mib(_status_kib("VmRSS"))
    mx.random.seed(SEED)
    model, _ = load_model(folder)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    base_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if side.startswith("mlx_lm"):
        model.freeze()
        config = {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0, "keys": list(MLX_KEYS)}
        linear_to_lora_layers(model, len(model.layers), config)
        module = model
    else:
        spec = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0}
        adapted = peftdecl.attach(model, spec | {"target_modules": list(TARGETS)}, seed=SEED)
        module = adapted.engine.model  # type: ignore[attr-defined]
    module.train()
    trainable = sum(v.size for _, v in tree_flatten(module.trainable_parameters()))
    optimizer = optim.AdamW(learning_rate=LEARNING_RATE, weight_decay=0.0)
    loss_and_grad = nn.value_and_grad(module, default_loss)
    state = [module.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled(batch: mx.array, lengths: mx.array) -> mx.array:
        (loss, _tokens), grads = loss_and_grad(module, batch, lengths)
        optimizer.update(module, grads)
        return loss

    batch = mx.random.randint(4, int(model.args.vocab_size), (1, seq + 1), key=mx.random.key(SEED))
    lengths = mx.array([[1, seq]])

    def step() -> float:
        loss = compiled(batch, lengths)
        mx.eval(state, loss)
        return float(loss.item())

    measured = _measured_steps(
        step,
        warmup,
        steps,
        reset_device=mx.reset_peak_memory,
        device_peak_mib=lambda: mx.get_peak_memory() / 2**20,
    )
    return Measured(
        side=side,
        baseline_rss_mib=baseline,
        **measured,
        trainable=trainable,
        base_bytes=base_bytes,
        notes=f"MLX {mx.__version__} on {mx.default_device()}",
    )
