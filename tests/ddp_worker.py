"""torchrun worker of tests/test_train_torch.py: each of the processes trains one optimizer step on its half of a
fixed global batch (each rank seeded differently, so the runtime's broadcast of rank 0's adapter values matters),
and rank 0 writes the loss and the updated adapter tensors of each kind to ``OUT/<kind>.npz``.

Usage: ``python -m torch.distributed.run --nproc-per-node 2 tests/ddp_worker.py MODEL_DIR OUT KIND...``
(with the repository root on PYTHONPATH)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from peftdecl.train.runtime import MicroBatch

SEED = 7
LEARNING_RATE = 1e-2


def global_batch() -> MicroBatch:
    """Four rows of different lengths and loss offsets (padding 0 after each row's length)."""
    rng = np.random.default_rng(SEED)
    lengths, offsets = np.array([12, 9, 7, 10], np.int32), np.array([3, 0, 2, 1], np.int32)
    ids = rng.integers(4, 100, size=(4, 12)).astype(np.int32)
    for row, n in enumerate(lengths):
        ids[row, n:] = 0
    return MicroBatch(ids, lengths, offsets)


GLOBAL_BATCH = global_batch()


def run_step(rt: object, batch: MicroBatch) -> tuple[float, float]:
    """One optimizer step of ``rt`` on this process's contiguous share of ``batch``: (mean loss, counted)."""
    from peftdecl_torch.training import TorchTrainingRuntime

    assert isinstance(rt, TorchTrainingRuntime)
    rows = len(batch.lengths) // rt.world_size
    share = slice(rt.rank * rows, (rt.rank + 1) * rows)
    local = MicroBatch(batch.input_ids[share], batch.lengths[share], batch.offsets[share])
    (counted,) = rt.all_reduce_sum([float(local.token_count())])
    total = rt.forward_backward(local, 1.0 / counted, 1.0 / rt.world_size)
    rt.optimizer_step(LEARNING_RATE, 0)
    (total,) = rt.all_reduce_sum([total])
    return total / counted, counted


def main(model_dir: str, out: str, kinds: list[str]) -> None:
    from tests.test_train_torch import SPECS, runtime

    opened = []
    rank = int(os.environ["RANK"])
    for kind in kinds:
        # each process initialises differently: the runtime must start every rank from rank 0's values
        rt = runtime(Path(model_dir), SPECS[kind], seed=SEED + rank)  # the first creates the process group
        assert rt.world_size == 2, rt.world_size
        opened.append(rt)
        loss, _ = run_step(rt, GLOBAL_BATCH)
        if rt.rank == 0:
            arrays = {k: p.detach().numpy() for k, p in rt.params.items()}
            np.savez(Path(out) / f"{kind}.npz", __loss__=np.float64(loss), **arrays)
    for rt in reversed(opened):
        rt.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
