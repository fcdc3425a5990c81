"""The MLX half of ``peftdecl train``: :class:`MlxTrainingRuntime`, one process (data parallelism is torch's).

A micro-batch's gradient comes from ``nn.value_and_grad(engine.model, loss)`` and is added to a gradient tree;
the optimizer step clips it, updates the model's arrays and runs AdaLoRA's rank allocator. Both run compiled with
``mx.compile`` (as mlx-lm's trainer compiles its step), the model's whole state an input and an output, so the
engine's dropout key, which lives in that state, advances from call to call instead of being frozen into the
graph. ``PEFTDECL_TRAIN_COMPILE=0`` (or ``compile=False``) runs the same functions uncompiled.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map, tree_reduce

from peftdecl._json import JsonObject
from peftdecl.errors import PeftdeclError
from peftdecl.model import AdaptedModel
from peftdecl.train.config import TrainFile
from peftdecl.train.runtime import MicroBatch, Tokenizer, TrainingRuntime
from peftdecl_mlx.engine import MlxEngine
from peftdecl_mlx.inventory import flatten
from peftdecl_mlx.rank_allocator import MlxRankAllocator
from peftdecl_mlx.training_ops import (
    TorchAdamW,
    host_random_layers,
    install_checkpointing,
    orthogonal_regularizer,
)

COMPILE_VARIABLE = "PEFTDECL_TRAIN_COMPILE"
"""Set to 0 to run the training step uncompiled (debugging)."""
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_Tree = Any  # an mlx parameter tree: nested dicts and lists of mx.array


def _global_norm(grads: _Tree) -> mx.array:
    """‖g‖₂ over every array of the tree (accumulated in float32)."""
    total = tree_reduce(lambda acc, g: acc + mx.square(g.astype(mx.float32)).sum(), grads, mx.array(0.0))
    return mx.sqrt(total)


class MlxTrainingRuntime:
    """:class:`peftdecl.train.runtime.TrainingRuntime` on MLX for the model's active, trainable adapters."""

    rank = 0
    world_size = 1

    def __init__(
        self, model: AdaptedModel, tokenizer: Tokenizer, config: TrainFile, *, compile: bool | None = None
    ) -> None:
        self.model = model
        self._tokenizer = tokenizer
        self._engine = cast(MlxEngine, model.engine)
        self._module: nn.Module = self._engine.model
        if not model.trainable_parameters():
            raise PeftdeclError("nothing to train: the model has no active adapter with trainable tensors")
        training = config.training
        self._max_norm = float(training.max_grad_norm)
        self._optimizer: optim.Optimizer = (
            TorchAdamW(
                (training.adam_beta1, training.adam_beta2), training.adam_epsilon, training.weight_decay
            )
            if training.optim == "adamw"
            else optim.SGD(learning_rate=training.learning_rate, weight_decay=training.weight_decay)
        )
        self._optimizer.init(self._module.trainable_parameters())
        self._updates = 0
        self._grads: _Tree | None = None
        self._adalora = {
            name: MlxRankAllocator(model.plan(name))
            for name in model.active_adapters
            if model.plan(name).kind == "adalora"
        }
        plans = [model.plan(name) for name in model.active_adapters]
        on_host = host_random_layers(plans)
        wanted = compile if compile is not None else os.environ.get(COMPILE_VARIABLE, "1") != "0"
        if wanted and on_host:
            warnings.warn(
                f"training uncompiled: {on_host[0]} draws its module (or block) dropout on the host, which a "
                "compiled step cannot do",
                stacklevel=2,
            )
        self.compiled = wanted and not on_host
        """Whether the step runs through mx.compile."""
        self._undo_checkpointing: Callable[[], None] | None = (
            install_checkpointing(self._module) if training.gradient_checkpointing else None
        )
        self._build_steps()

    # -- the step ------------------------------------------------------------------------------------------
    def _loss(
        self, inputs: mx.array, targets: mx.array, mask: mx.array, scale: mx.array, share: mx.array
    ) -> tuple[mx.array, mx.array]:
        """(scale · Σ counted cross-entropy + share · regulariser, Σ counted cross-entropy)."""
        total = self._cross_entropy_sum(inputs, targets, mask)
        value = scale * total
        for name, allocator in self._adalora.items():
            params = self._engine.trainable_parameters((name,))
            value = value + share * orthogonal_regularizer(allocator.plan, params)
        return value, total

    def _cross_entropy_sum(self, inputs: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
        logits = self.model(inputs)
        if logits.shape[1] != targets.shape[1]:  # prompt tuning: the virtual tokens' positions come first
            logits = logits[:, -targets.shape[1] :]
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
        total: mx.array = (ce * mask).sum()
        return total

    def _build_steps(self) -> None:
        """(Re)make the gradient and update functions; a plan change (AdaLoRA's final rank pattern) must not run
        a graph traced with the old plan."""
        value_and_grad = nn.value_and_grad(self._module, self._loss)

        def gradient(
            inputs: mx.array,
            targets: mx.array,
            mask: mx.array,
            scale: mx.array,
            share: mx.array,
            accumulated: _Tree | None,
        ) -> tuple[mx.array, _Tree]:
            (_, total), grads = value_and_grad(inputs, targets, mask, scale, share)
            if accumulated is not None:
                grads = tree_map(mx.add, grads, accumulated)
            return total, grads

        keep_grads = bool(self._adalora)

        def update(grads: _Tree) -> tuple[mx.array, _Tree | None]:
            if self._max_norm > 0:
                grads, norm = optim.clip_grad_norm(grads, self._max_norm)
            else:
                norm = _global_norm(grads)
            self._optimizer.update(self._module, grads)
            return norm, grads if keep_grads else None

        if self.compiled:
            model_state = [self._module.state]
            both = [self._module.state, self._optimizer.state]
            self._gradient = mx.compile(gradient, inputs=model_state, outputs=model_state)
            self._update = mx.compile(update, inputs=both, outputs=both)
        else:
            self._gradient, self._update = gradient, update

    def forward_backward(self, batch: MicroBatch, scale: float, share: float) -> float:
        ids = mx.array(np.asarray(batch.input_ids, dtype=np.int32))
        mask = mx.array(batch.loss_mask())
        total, self._grads = self._gradient(
            ids[:, :-1],
            ids[:, 1:],
            mask,
            mx.array(scale, dtype=mx.float32),
            mx.array(share, dtype=mx.float32),
            self._grads,
        )
        mx.eval(total, self._grads)
        return _scalar(total)

    def optimizer_step(self, learning_rate: float, step: int) -> float:
        if self._grads is None:
            raise PeftdeclError("optimizer_step: no gradients; call forward_backward first")
        if isinstance(self._optimizer, TorchAdamW):
            self._optimizer.prepare(learning_rate, self._updates + 1)
        else:
            self._optimizer.learning_rate = learning_rate
        norm, clipped = self._update(self._grads)
        mx.eval(norm, self._module.state, self._optimizer.state)
        self._grads = None
        self._updates += 1
        if clipped is not None:
            self._allocate(step, clipped)
        return _scalar(norm)

    def _allocate(self, step: int, grads: _Tree) -> None:
        """PEFT's order: after the optimizer step, update_and_allocate(step) with the step's gradients. The final
        mask (from step total_step − tfinal on) becomes the spec's rank_pattern, as PEFT writes it to the config."""
        by_path = dict(flatten(grads))
        for name, allocator in self._adalora.items():
            params = self._engine.trainable_parameters((name,))
            paths = self._paths((name,))
            _, pattern = allocator.update_and_allocate(step, params, {k: by_path[paths[k]] for k in params})
            mx.eval(list(params.values()))
            final = step >= allocator.total_step - allocator.tfinal
            spec = self.model.spec(name)
            recorded = getattr(spec, "rank_pattern", None)
            if (
                pattern is not None
                and final
                and (recorded is None or _as_tuples(recorded) != _as_tuples(pattern))
            ):
                self.model.update_spec(name, rank_pattern=pattern)
                self._build_steps()

    def _paths(self, names: tuple[str, ...]) -> dict[str, str]:
        """Trainable key -> its path in the model's tree (the two views hold the very same arrays)."""
        by_id = {id(v): path for path, v in flatten(self._engine.parameter_tree(names))}
        return {key: by_id[id(v)] for key, v in self._engine.trainable_parameters(names).items()}

    @property
    def rank_pattern(self) -> dict[str, dict[str, list[bool]]]:
        """AdaLoRA adapter -> its allocator's latest mask (``<module>.lora_E`` -> kept triplets); {} for others."""
        return {n: dict(a.rank_pattern) for n, a in self._adalora.items() if a.rank_pattern is not None}

    # -- evaluation and generation -------------------------------------------------------------------------
    def eval_loss(self, batch: MicroBatch) -> float:
        ids = mx.array(np.asarray(batch.input_ids, dtype=np.int32))
        was_training = bool(self._module.training)
        self.model.eval()
        try:
            total = self._cross_entropy_sum(ids[:, :-1], ids[:, 1:], mx.array(batch.loss_mask()))
            mx.eval(total)
            return _scalar(total)
        finally:
            self.model.train(was_training)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        from peftdecl_mlx.model_io import generate

        return generate(self.model, prompt_ids, max_new_tokens, self._tokenizer.eos_token_id)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        return [float(v) for v in values]

    # -- state ---------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], JsonObject]:
        """Optimizer moments (``optimizer.<path>``, float32) and AdaLoRA scores (``adalora.<adapter>.<what>.<key>``)
        as tensors; counters, the generator key, dtypes and AdaLoRA's mask as JSON."""
        tensors: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        scalars: dict[str, float] = {}
        for path, value in flatten(self._optimizer.state):
            if value.ndim == 0:
                scalars[path] = _scalar(value)
                continue
            tensors["optimizer." + path] = np.array(value.astype(mx.float32))
            dtypes[path] = str(value.dtype).removeprefix("mlx.core.")
        adalora: dict[str, object] = {}
        for name, allocator in self._adalora.items():
            for what in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                for key, value in getattr(allocator, what).items():
                    tensors[f"adalora.{name}.{what}.{key}"] = np.array(value.astype(mx.float32))
            adalora[name] = {"rank_pattern": allocator.rank_pattern}
        key = self._engine.get_rng_state()["key"]
        meta: JsonObject = {
            "backend": "mlx",
            "optimizer": type(self._optimizer).__name__,
            "updates": self._updates,
            "scalars": scalars,
            "dtypes": dtypes,
            "rng_key": [int(k) for k in np.asarray(key).reshape(-1)],
            "adalora": adalora,
        }
        return tensors, meta

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: JsonObject) -> None:
        if meta.get("backend") != "mlx":
            raise PeftdeclError(
                f"the checkpoint's training state comes from the {meta.get('backend')!r} backend; "
                "resume it with that backend"
            )
        if meta.get("optimizer") != type(self._optimizer).__name__:
            raise PeftdeclError(
                f"the checkpoint was trained with {meta.get('optimizer')}, this run uses "
                f"{type(self._optimizer).__name__} (training.optim)"
            )
        dtypes = cast(dict[str, str], meta.get("dtypes", {}))
        scalars = cast(dict[str, float], meta.get("scalars", {}))
        expected = {path for path, _ in flatten(self._optimizer.state)}
        given = {k.removeprefix("optimizer.") for k in tensors if k.startswith("optimizer.")} | set(scalars)
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise PeftdeclError(
                f"the checkpoint's optimizer state does not fit this adapter (missing {missing[:3]}, "
                f"unexpected {extra[:3]})"
            )
        for path, dtype in dtypes.items():
            _set_path(
                self._optimizer.state, path, mx.array(tensors["optimizer." + path], dtype=_DTYPES[dtype])
            )
        for path, value in scalars.items():
            current = _get_path(self._optimizer.state, path)
            _set_path(self._optimizer.state, path, mx.array(value, dtype=current.dtype))
        self._updates = int(cast(int, meta["updates"]))
        self._engine.set_rng_state({"key": np.asarray(meta["rng_key"], dtype=np.uint32)})
        saved_adalora = cast(dict[str, dict[str, Any]], meta.get("adalora", {}))
        for name, allocator in self._adalora.items():
            allocator.reset_ipt()
            for what in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                prefix = f"adalora.{name}.{what}."
                found = {k[len(prefix) :]: mx.array(v) for k, v in tensors.items() if k.startswith(prefix)}
                setattr(allocator, what, found)
            pattern = saved_adalora.get(name, {}).get("rank_pattern")
            allocator.rank_pattern = None if pattern is None else {k: list(v) for k, v in pattern.items()}
        mx.eval(self._optimizer.state)
        self._build_steps()

    def peak_memory(self) -> int | None:
        """mx.get_peak_memory() (Metal, or the CPU allocator where it counts); None where it reports 0."""
        reader = getattr(mx, "get_peak_memory", None) or getattr(
            getattr(mx, "metal", None), "get_peak_memory", None
        )
        peak = int(reader()) if reader is not None else 0
        return peak or None

    def close(self) -> None:
        if self._undo_checkpointing is not None:
            self._undo_checkpointing()
            self._undo_checkpointing = None
        self._grads = None


def _scalar(value: mx.array) -> float:
    return float(np.asarray(value.astype(mx.float32)))


def _as_tuples(pattern: Mapping[str, Sequence[bool]]) -> dict[str, tuple[bool, ...]]:
    return {k: tuple(bool(b) for b in v) for k, v in pattern.items()}


def _get_path(tree: _Tree, path: str) -> Any:
    node = tree
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _set_path(tree: _Tree, path: str, value: mx.array) -> None:
    """Replace one leaf of a nested dict/list tree in place (the tree object stays the one a compiled step
    reads)."""
    *heads, leaf = path.split(".")
    node = _get_path(tree, ".".join(heads)) if heads else tree
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value


if TYPE_CHECKING:
    _conforms: type[TrainingRuntime] = MlxTrainingRuntime
