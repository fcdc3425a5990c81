"""The torch :class:`peftdecl.train.runtime.TrainingRuntime`: gradients of the counted cross-entropy (plus AdaLoRA's
orthogonality term), AdamW or SGD over the adapter's live parameters, clipping, AdaLoRA's rank allocation, data
parallelism over ``torch.distributed`` and the state a resume needs.

Data parallelism: every process runs the same adapted model on its share of the global batch, and
``optimizer_step`` sums the gradients of all processes with one ``all_reduce`` over a flat buffer, once per
optimizer step. That is what DDP does when accumulation runs under ``no_sync``; a DDP wrapper is not used because
prompt and prefix tuning tables run outside the wrapped ``nn.Module`` (the engine feeds them in), so DDP would not
see their gradients. Sums, not means: the loop scales each micro-batch by 1 / (counted tokens of the global batch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812  (the torch idiom)
from torch import nn

from peftdecl._json import JsonObject
from peftdecl.errors import PeftdeclError
from peftdecl.plan import Plan, compile_plan
from peftdecl.spec.adalora import AdaLoraSpec
from peftdecl_numpy.rank_allocator import RankAllocator
from peftdecl_torch.engine import TorchEngine
from peftdecl_torch.kinds.adalora import orthogonal_regularizer, update_and_allocate
from peftdecl_torch.model_io import generate, model_device
from peftdecl_torch.training_state import (
    allocator_state,
    load_allocator_state,
    load_optimizer_state,
    load_rng_state,
    optimizer_state,
    rng_state,
)

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel
    from peftdecl.train.config import TrainFile, TrainingConfig
    from peftdecl.train.runtime import MicroBatch, Tokenizer


def distributed_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun started several processes, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


def make_optimizer(params: Sequence[nn.Parameter], training: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or SGD (L2 weight decay), as the training section names."""
    if training.optim == "sgd":
        return torch.optim.SGD(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    return torch.optim.AdamW(
        params,
        lr=training.learning_rate,
        betas=(training.adam_beta1, training.adam_beta2),
        eps=training.adam_epsilon,
        weight_decay=training.weight_decay,
    )


def counted_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ mask · CE(logits[:, t], ids[:, t+1]) in float32; ``logits`` may carry extra leading positions (prompt
    tuning's virtual tokens), only the last ``L`` count."""
    length = ids.shape[1]
    predicting = logits[:, -length:-1, :].float()
    ce = F.cross_entropy(
        predicting.reshape(-1, predicting.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], length - 1)
    return (ce * mask).sum()


class TorchTrainingRuntime:
    """One process's half of a ``peftdecl train`` run on torch (see the module docstring)."""

    def __init__(self, model: AdaptedModel, tokenizer: Tokenizer, config: TrainFile) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.training = config.training
        self.device = model_device(model)
        self.rank, self.world_size = 0, 1
        self._owns_group = False
        self._connect()
        if self.training.gradient_checkpointing:
            self._enable_checkpointing()
        found: dict[str, nn.Parameter] = model.trainable_parameters()
        if not found:
            raise PeftdeclError("the adapter has no trainable parameters (is it loaded in inference mode?)")
        self.params = {key: found[key] for key in sorted(found)}  # one order on every process
        self._broadcast_parameters()
        self.optimizer = make_optimizer(list(self.params.values()), self.training)
        self.plan = model.plan()
        self.allocator: RankAllocator | None = None
        self._regulariser_plan: Plan | None = None
        self._orth_weight = 0.0
        if self.plan.kind == "adalora":
            self._start_allocation(self.plan)

    # -- setup ---------------------------------------------------------------------------------------------
    def _connect(self) -> None:
        """Join torchrun's process group (gloo on CPU, NCCL on CUDA), creating it unless someone has."""
        env = distributed_env()
        if env is None:
            return
        rank, world, local_rank = env
        if not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(local_rank)
                dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
            else:
                dist.init_process_group("gloo")
            self._owns_group = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if (self.rank, self.world_size) != (rank, world):
            raise PeftdeclError(
                f"torch.distributed says rank {self.rank} of {self.world_size}, "
                f"torchrun's environment {rank} of {world}"
            )

    def _enable_checkpointing(self) -> None:
        """transformers' activation checkpointing, non-reentrant (the base is frozen: its inputs need no grad)."""
        base = self.model.base_model
        enable = getattr(base, "activation_checkpointing_enable", None)  # transformers ≥ 5.x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
            return
        enable = getattr(base, "gradient_checkpointing_enable", None)
        if enable is None:
            raise PeftdeclError(
                "training.gradient_checkpointing: the model has no gradient_checkpointing_enable()"
            )
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _broadcast_parameters(self) -> None:
        """Every process starts from rank 0's adapter values (one broadcast of a flat buffer)."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            values = list(self.params.values())
            dtypes = {v.dtype for v in values}
            common = dtypes.pop() if len(dtypes) == 1 else torch.float32  # float32 holds bf16/fp16 exactly
            flat = torch.cat([v.detach().reshape(-1).to(common) for v in values])
            dist.broadcast(flat, src=0)
            offset = 0
            for v in values:
                v.copy_(flat[offset : offset + v.numel()].view_as(v))
                offset += v.numel()

    def _start_allocation(self, plan: Plan) -> None:
        """AdaLoRA: the rank allocator and the orthogonality term, both over the tensors the run started with
        (PEFT keeps init_r-sized modules while training; only a pruned start file has fewer triplets)."""
        spec = cast(AdaLoraSpec, plan.spec)
        self._regulariser_plan = plan
        self._orth_weight = float(spec.orth_reg_weight)
        self.allocator = RankAllocator(plan)

    # -- TrainingRuntime -----------------------------------------------------------------------------------
    def _ids_and_mask(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(batch.input_ids, dtype=np.int64)).to(self.device)
        mask = torch.from_numpy(batch.loss_mask()).to(self.device)
        return ids, mask

    def _regulariser(self) -> torch.Tensor | None:
        if self._regulariser_plan is None or self._orth_weight == 0.0:
            return None
        return orthogonal_regularizer(self._regulariser_plan, self.params, self._orth_weight)

    def forward_backward(self, batch: MicroBatch, scale: float, share: float) -> float:
        """Backward of scale · Σ counted CE + share · AdaLoRA's orthogonality term; returns Σ counted CE."""
        ids, mask = self._ids_and_mask(batch)
        logits = self.model(input_ids=ids).logits
        total = counted_cross_entropy(logits, ids, mask)
        loss = scale * total
        regulariser = self._regulariser()
        if regulariser is not None and share:
            loss = loss + share * regulariser
        loss.backward()
        return float(total.detach())

    def _all_reduce_gradients(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def optimizer_step(self, learning_rate: float, step: int) -> float:
        """Sum gradients over processes, clip, step at ``learning_rate``, allocate AdaLoRA ranks (after the
        update, before the gradients are cleared, as PEFT's loop does), zero the gradients; the norm before clipping."""
        params = [p for p in self.params.values() if p.grad is not None]
        grads = [cast(torch.Tensor, p.grad) for p in params]
        if self.world_size > 1 and grads:
            self._all_reduce_gradients(grads)
        if self.training.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.training.max_grad_norm)
        elif grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        else:
            norm = torch.zeros(())
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.step()
        if self.allocator is not None:
            self._allocate(step)
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _allocate(self, step: int) -> None:
        """PEFT's update_and_allocate; once the mask is final (or at the run's last step) the adapter's spec takes
        the rank pattern, so that checkpoints and the saved adapter are pruned as PEFT saves them. Before that the
        spec is left alone: PEFT keeps training the masked triplets between masking steps."""
        allocator = cast(RankAllocator, self.allocator)
        update_and_allocate(self.model, allocator, step)
        final = allocator.total_step - allocator.tfinal
        pattern = allocator.rank_pattern
        if pattern is None or not (step >= final or step == allocator.total_step - 1):
            return
        current = cast(AdaLoraSpec, self.model.spec()).rank_pattern
        if current is None or {k: list(v) for k, v in current.items()} != pattern:
            self.model.update_spec(rank_pattern=pattern)

    def eval_loss(self, batch: MicroBatch) -> float:
        """Σ counted cross-entropy in eval mode (dropout off), without gradients; the mode is restored."""
        was_training = cast(nn.Module, self.model.base_model).training
        ids, mask = self._ids_and_mask(batch)
        self.model.eval()
        try:
            with torch.no_grad():
                return float(counted_cross_entropy(self.model(input_ids=ids).logits, ids, mask))
        finally:
            self.model.train(was_training)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        return generate(self.model, prompt_ids, max_new_tokens, self.tokenizer.eos_token_id)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        if self.world_size == 1:
            return [float(v) for v in values]
        buffer = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(buffer)
        return [float(v) for v in buffer.tolist()]

    def state(self) -> tuple[dict[str, np.ndarray], JsonObject]:
        tensors, optimizer_meta = optimizer_state(self.optimizer, self.params)
        tensors.update(rng_state(self._engine))
        meta: JsonObject = {"optimizer": optimizer_meta, "optim": self.training.optim}
        if self.allocator is not None and self._regulariser_plan is not None:
            allocator_tensors, allocator_meta = allocator_state(self.allocator)
            tensors.update(allocator_tensors)
            start = cast(AdaLoraSpec, self._regulariser_plan.spec).rank_pattern
            meta["adalora"] = {**allocator_meta, "start_rank_pattern": start}
        return tensors, meta

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: JsonObject) -> None:
        if meta.get("optim", self.training.optim) != self.training.optim:
            raise PeftdeclError(
                f"training.optim is {self.training.optim!r} but the checkpoint was trained with {meta['optim']!r}"
            )
        load_optimizer_state(self.optimizer, self.params, tensors, meta.get("optimizer", {}))
        load_rng_state(self._engine, tensors)
        adalora = meta.get("adalora")
        if self.allocator is not None and isinstance(adalora, dict):
            # the checkpoint's spec may carry the final mask; allocation and the regulariser run over the start's
            start = self.model.spec().replace(rank_pattern=adalora.get("start_rank_pattern"))
            self._start_allocation(compile_plan(start, self.model.info))
            load_allocator_state(self.allocator, self.params, tensors, adalora)

    def peak_memory(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    @property
    def _engine(self) -> TorchEngine:
        return cast(TorchEngine, self.model.engine)
