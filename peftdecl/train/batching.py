"""Which examples make each optimizer step, and their padded micro-batches (mlx-lm's scheme).

The examples are sorted by length and cut into consecutive global batches, so a batch holds sequences of similar
length and little padding; the order of the global batches is shuffled once per epoch from ``(seed, epoch)``, so
any step's batch is known without replaying the run (what a resume needs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from peftdecl.errors import DataError
from peftdecl.train.data import Dataset, Example
from peftdecl.train.runtime import MicroBatch

PAD_MULTIPLE = 32
"""Rows are padded to one more than a multiple of this (mlx-lm's width), so the model input ``ids[:, :-1]``
is a multiple of it wide; never wider than max_seq_length."""


class BatchOrder:
    """The global batch (``global_batch`` example indices) of every optimizer step: examples sorted by length
    (stable), cut into consecutive chunks (the remainder dropped), chunks permuted per epoch by
    ``np.random.default_rng([seed, epoch])``."""

    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int) -> None:
        if global_batch < 1:
            raise ValueError(f"global_batch must be at least 1, got {global_batch}")
        if len(lengths) < global_batch:
            raise DataError(
                f"the training data holds {len(lengths)} examples, fewer than one global batch of "
                f"{global_batch} (per_device_train_batch_size × gradient_accumulation_steps × processes)"
            )
        by_length = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
        steps = len(lengths) // global_batch
        self._chunks: np.ndarray = by_length[: steps * global_batch].reshape(steps, global_batch)
        self.global_batch = global_batch
        self.seed = seed
        self._permutation: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per pass over the data (``len(lengths) // global_batch``)."""
        return int(self._chunks.shape[0])

    def permutation(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the chunks."""
        if self._permutation is None or self._permutation[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._permutation = (epoch, rng.permutation(self.steps_per_epoch))
        return self._permutation[1]

    def indices(self, step: int) -> np.ndarray:
        """Example indices (int64 ``[global_batch]``) of 0-based optimizer step ``step``."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        return np.array(self._chunks[int(self.permutation(epoch)[within])], dtype=np.int64)


def pad(examples: Sequence[Example], max_seq_length: int | None) -> MicroBatch:
    """Right-pad with 0 to ``1 + PAD_MULTIPLE·⌈longest / PAD_MULTIPLE⌉`` columns, capped at ``max_seq_length``
    (rows longer than the width are cut, as mlx-lm's iterate_batches does)."""
    longest = max((len(e.tokens) for e in examples), default=0)
    width = 1 + PAD_MULTIPLE * -(-longest // PAD_MULTIPLE)
    if max_seq_length is not None:
        width = min(width, max_seq_length)
    ids = np.zeros((len(examples), width), dtype=np.int32)
    lengths = np.zeros(len(examples), dtype=np.int32)
    for row, example in enumerate(examples):
        n = min(len(example.tokens), width)
        ids[row, :n] = example.tokens[:n]
        lengths[row] = n
    offsets = np.asarray([e.offset for e in examples], dtype=np.int32).reshape(len(examples))
    return MicroBatch(ids, lengths, offsets)


def micro_batches(
    dataset: Dataset,
    indices: np.ndarray,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    max_seq_length: int,
) -> list[MicroBatch]:
    """Process ``rank``'s share of a global batch: ``indices[rank·k·m : (rank+1)·k·m]`` (``m`` the micro-batch
    size, ``k`` the accumulation steps) as ``k`` padded micro-batches of ``m`` rows, in order."""
    share, left = divmod(len(indices), world_size)
    if left or share % micro_batch_size or not 0 <= rank < world_size:
        raise ValueError(
            f"a global batch of {len(indices)} does not split into {world_size} processes × micro-batches "
            f"of {micro_batch_size} (rank {rank})"
        )
    mine = indices[rank * share : (rank + 1) * share]
    return [
        pad([dataset.examples[int(i)] for i in mine[start : start + micro_batch_size]], max_seq_length)
        for start in range(0, share, micro_batch_size)
    ]


def eval_batches(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1) -> list[MicroBatch]:
    """Every example once, in file order, ``batch_size`` per batch (the last may be shorter); process ``rank``
    takes batches ``rank, rank + world_size, …``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    examples = dataset.examples
    starts = range(0, len(examples), batch_size)[rank::world_size]
    return [pad(examples[start : start + batch_size], dataset.max_seq_length) for start in starts]


def epoch_of(step: int, steps_per_epoch: int) -> float:
    """Epochs completed after ``step`` optimizer steps (fractional), for logs."""
    return step / steps_per_epoch if steps_per_epoch else 0.0
