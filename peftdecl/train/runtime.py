"""What the training loop asks of a backend: a :class:`TrainingRuntime` per run, made by the backend's optional
:class:`TrainingBackend` methods. The core never imports a framework; arrays cross this boundary as NumPy.

Loss convention (mlx-lm's): for a micro-batch of token ids ``ids [b, L]`` with row lengths ``n`` and loss offsets
``o``, position ``t`` of ``ids[:, :-1]`` predicts ``ids[:, t+1]`` and counts when ``o ≤ t+1 < n``; the loss of a
step is Σ counted cross-entropy / the number of counted tokens of the whole global batch (all micro-batches of all
processes), so that accumulation and data parallelism equal one larger batch.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from peftdecl._json import JsonObject

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel
    from peftdecl.train.config import QuantizationConfig, TrainFile


@dataclass(frozen=True)
class MicroBatch:
    """Right-padded token ids and where each row's loss starts and ends."""

    input_ids: np.ndarray
    """int32 ``[b, L]``; padding is token 0 (never counted)."""
    lengths: np.ndarray
    """int32 ``[b]``: real tokens per row (after truncation)."""
    offsets: np.ndarray
    """int32 ``[b]``: first position counted as a target (the prompt's length with mask_prompt, else 0)."""

    def loss_mask(self) -> np.ndarray:
        """float32 ``[b, L-1]``: 1 where target ``ids[:, t+1]`` counts, i.e. ``offsets ≤ t+1 < lengths``."""
        steps = np.arange(1, self.input_ids.shape[1], dtype=np.int64)[None, :]
        counted = (steps >= self.offsets[:, None]) & (steps < self.lengths[:, None])
        return counted.astype(np.float32)

    def token_count(self) -> int:
        """Counted target tokens in this micro-batch."""
        return int(self.loss_mask().sum())


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer (``PreTrainedTokenizerFast``) the data pipeline uses."""

    eos_token_id: int | None
    bos_token_id: int | None
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...
    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: object) -> object: ...


class TrainingRuntime(Protocol):
    """One run's framework-specific half: gradients, optimizer, evaluation, generation and their state.

    Made once per process by :meth:`TrainingBackend.training_runtime`; ``rank``/``world_size`` describe
    data-parallel processes (1 process: 0/1)."""

    model: AdaptedModel
    rank: int
    world_size: int

    def forward_backward(self, batch: MicroBatch, scale: float, share: float) -> float:
        """Add ∂(scale · Σ counted cross-entropy + share · regulariser)/∂θ to the gradient buffers and return the
        unscaled Σ counted cross-entropy (float). ``share`` is this micro-batch's fraction of the optimizer step
        (1 / (accumulation · world size)); the regulariser is a kind's extra loss (AdaLoRA's orthogonality
        term × orth_reg_weight), 0 for others."""
        ...

    def optimizer_step(self, learning_rate: float, step: int) -> float:
        """Sum gradients over processes, clip to ``max_grad_norm``, apply the optimizer at ``learning_rate``, run
        per-step kind hooks (AdaLoRA's ``update_and_allocate(step)``; ``step`` is the number of updates done
        before this one, 0 for the first, as PEFT's own loop counts), zero gradients; return the global gradient
        norm before clipping."""
        ...

    def eval_loss(self, batch: MicroBatch) -> float:
        """Σ counted cross-entropy with no gradient and the model in eval mode (restored after)."""
        ...

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt (new tokens only; stops at the tokenizer's EOS)."""
        ...

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over processes (identity with one process)."""
        ...

    def state(self) -> tuple[dict[str, np.ndarray], JsonObject]:
        """Everything a resume needs beyond the adapter: optimizer moments and counters, generator states, kind
        state (AdaLoRA's allocator), as tensors (saved with safetensors) plus JSON metadata."""
        ...

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: JsonObject) -> None:
        """Restore :meth:`state` (after the adapter's arrays were loaded)."""
        ...

    def peak_memory(self) -> int | None:
        """Peak bytes of device memory (CUDA/Metal) or None where the framework does not say."""
        ...

    def close(self) -> None:
        """Release process groups and the like."""
        ...


@runtime_checkable
class TrainingBackend(Protocol):
    """Optional Backend methods behind ``peftdecl train``, ``merge`` and ``generate``."""

    def load_pretrained(
        self, directory: Path, *, device: str, dtype: str, quantization: QuantizationConfig | None = None
    ) -> tuple[object, Tokenizer]:
        """The base model (the backend's own module) and its tokenizer from a local HF checkpoint folder;
        with ``quantization`` its linear layers are quantised as they load (QLoRA), and a folder that is
        quantised already loads quantised as it is."""
        ...

    def training_runtime(
        self, model: AdaptedModel, tokenizer: Tokenizer, config: TrainFile
    ) -> TrainingRuntime:
        """The runtime that trains ``model`` (adapter attached, trainable) as ``config.training`` says."""
        ...

    def generate(
        self, model: AdaptedModel, prompt_ids: Sequence[int], max_new_tokens: int, eos: int | None
    ) -> list[int]:
        """Greedy continuation (new tokens only), stopping at ``eos``."""
        ...

    def save_merged(
        self,
        model: AdaptedModel,
        tokenizer: Tokenizer,
        source: Path,
        out: Path,
        dtype: str | None,
        *,
        dequantize: bool = False,
    ) -> None:
        """The adapter merged into the base, written to ``out`` as sharded safetensors with ``source``'s config
        (dtype changed when ``dtype`` is given) and the tokenizer; atomic (``out`` appears complete or not). A
        quantised base is written re-quantised, or as float weights with ``dequantize``."""
        ...


class TrainingFromModules:
    """The :class:`TrainingBackend` methods of a backend package that keeps them in two modules,
    ``<package>.model_io`` (load_pretrained, generate, save_merged) and ``<package>.training`` (the runtime class
    named by ``runtime_class``), imported on first use so that listing backends imports no framework."""

    package: str
    runtime_class: str

    def _module(self, name: str) -> Any:
        return importlib.import_module(f"{self.package}.{name}")

    def load_pretrained(
        self, directory: Path, *, device: str, dtype: str, quantization: QuantizationConfig | None = None
    ) -> tuple[object, Tokenizer]:
        """The backend's model and the tokenizer of a local HF checkpoint folder (see ``model_io``)."""
        loaded: tuple[object, Tokenizer] = self._module("model_io").load_pretrained(
            directory, device=device, dtype=dtype, quantization=quantization
        )
        return loaded

    def training_runtime(
        self, model: AdaptedModel, tokenizer: Tokenizer, config: TrainFile
    ) -> TrainingRuntime:
        runtime: TrainingRuntime = getattr(self._module("training"), self.runtime_class)(
            model, tokenizer, config
        )
        return runtime

    def generate(
        self, model: AdaptedModel, prompt_ids: Sequence[int], max_new_tokens: int, eos: int | None
    ) -> list[int]:
        return list(self._module("model_io").generate(model, prompt_ids, max_new_tokens, eos))

    def save_merged(
        self,
        model: AdaptedModel,
        tokenizer: Tokenizer,
        source: Path,
        out: Path,
        dtype: str | None,
        *,
        dequantize: bool = False,
    ) -> None:
        self._module("model_io").save_merged(model, tokenizer, source, out, dtype, dequantize=dequantize)
