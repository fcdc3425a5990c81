"""Batching: which examples make each optimizer step, and their padded micro-batches. Compared exactly with
mlx-lm's iterate_batches (the same global batches and padded arrays) and its default_loss mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peftdecl.errors import DataError
from peftdecl.train.batching import BatchOrder, epoch_of, eval_batches, micro_batches, pad
from peftdecl.train.data import Dataset, Example


def coded_tokens(index: int, length: int) -> list[int]:
    """Tokens that name their example and position (never 0, the padding id)."""
    return [1000 * (index + 1) + j for j in range(length)]


def make_dataset(lengths: list[int], offsets: list[int] | None = None, max_seq_length: int = 4096) -> Dataset:
    """Examples cut to ``max_seq_length`` as :func:`peftdecl.train.data.load_dataset` cuts them."""
    offsets = offsets or [0] * len(lengths)
    examples = tuple(
        Example(np.asarray(coded_tokens(i, n)[:max_seq_length], np.int32), o)
        for i, (n, o) in enumerate(zip(lengths, offsets, strict=True))
    )
    truncated = sum(n > max_seq_length for n in lengths)
    return Dataset(Path("data.jsonl"), "prompt_completion", examples, truncated, max_seq_length)


def rows_of(batch) -> list[int]:
    """Example indices of a padded batch's rows (decoded from the coded tokens)."""
    return [int(first) // 1000 - 1 for first in batch.input_ids[:, 0]]


def random_lengths(n: int, seed: int, high: int = 80) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, high, n).tolist()
    offsets = [int(rng.integers(0, n_)) for n_ in lengths]
    return lengths, offsets


# -- against mlx-lm's iterate_batches ---------------------------------------------------------------------------
@pytest.mark.parametrize(("batch_size", "max_seq_length"), [(4, 64), (3, 2048), (5, 33)])
def test_global_batches_equal_mlx_lm(batch_size, max_seq_length):
    """Over one epoch, the same set of global batches, each with the same padded ids, lengths and offsets (mlx-lm
    shuffles with the global NumPy generator, so batches are matched by their examples, not by position)."""
    pytest.importorskip("mlx.core")
    trainer = pytest.importorskip("mlx_lm.tuner.trainer")
    lengths, offsets = random_lengths(39, seed=batch_size)
    theirs = {}
    mlx_data = [(coded_tokens(i, n), o) for i, (n, o) in enumerate(zip(lengths, offsets, strict=True))]
    for ids, spans in trainer.iterate_batches(mlx_data, batch_size, max_seq_length, seed=0):
        ids, spans = np.array(ids), np.array(spans)
        theirs[tuple(sorted(int(v) // 1000 - 1 for v in ids[:, 0]))] = (ids, spans)
    dataset = make_dataset(lengths, offsets, max_seq_length)
    order = BatchOrder(lengths, batch_size, seed=7)  # mlx-lm sorts by the uncut length; so does this order
    assert order.steps_per_epoch == len(theirs) == 39 // batch_size
    for step in range(order.steps_per_epoch):
        (mine,) = micro_batches(dataset, order.indices(step), batch_size, 0, 1, max_seq_length)
        ids, spans = theirs[tuple(sorted(rows_of(mine)))]
        np.testing.assert_array_equal(mine.input_ids, ids)  # exact: integer token ids
        np.testing.assert_array_equal(mine.offsets, spans[:, 0])
        np.testing.assert_array_equal(mine.lengths, spans[:, 1])
        assert mine.input_ids.dtype == ids.dtype == np.int32


def test_loss_mask_is_mlx_lm_default_loss_mask_without_the_padding_target():
    """mlx-lm's default_loss counts targets at ``offset ≤ t+1 ≤ length``, one past the row's last token (a padding
    target, mlx-lm PR #1697); MicroBatch.loss_mask is that mask without it. The mask mlx-lm uses is read from the
    gradient of its loss with respect to the logits (non-zero exactly where a target counts)."""
    mx = pytest.importorskip("mlx.core")
    trainer = pytest.importorskip("mlx_lm.tuner.trainer")
    lengths = [5, 40, 40, 33, 1, 12]
    offsets = [0, 3, 39, 7, 0, 12]  # 12: a prompt as long as the row counts nothing
    (batch,) = micro_batches(make_dataset(lengths, offsets, 40), np.arange(6), 6, 0, 1, 40)
    assert batch.input_ids.shape == (6, 40)  # 1 + 32·2 capped at 40: rows of 40 are cut, none padded
    spans = mx.array(np.stack([batch.offsets, batch.lengths], axis=1))
    logits = mx.zeros((6, 39, 16))

    def mlx_lm_loss(out):
        return trainer.default_loss(lambda _inputs: out, mx.array(batch.input_ids % 16), spans)[0]

    theirs = np.abs(np.array(mx.grad(mlx_lm_loss)(logits))).sum(-1) > 0
    ours = batch.loss_mask().astype(bool)
    target = np.arange(1, 40)[None, :]
    padding_target = target == batch.lengths[:, None]
    np.testing.assert_array_equal(ours, theirs & ~padding_target)
    np.testing.assert_array_equal(ours | padding_target & theirs, theirs)
    assert [int(r.sum()) for r in ours] == [4, 37, 1, 26, 0, 0]
    assert [int(r.sum()) for r in theirs] == [5, 37, 1, 27, 1, 1]  # rows 1, 2 are cut: no padding target


# -- the order of global batches ------------------------------------------------------------------------------
def test_order_sorts_by_length_drops_the_remainder_and_permutes_per_epoch():
    lengths = [5, 3, 9, 3, 1, 7, 5, 2, 8, 6, 4]  # ties (3, 5) stay in index order
    order = BatchOrder(lengths, 3, seed=11)
    chunks = [[4, 7, 1], [3, 10, 0], [6, 9, 5]]  # sorted: 4 7 1 3 10 0 6 9 5 | 8 2 dropped
    assert order.steps_per_epoch == 3
    for epoch in range(4):
        visited = [order.indices(epoch * 3 + k).tolist() for k in range(3)]
        assert sorted(visited) == sorted(chunks)
        expected = np.random.default_rng([11, epoch]).permutation(3)
        assert visited == [chunks[i] for i in expected]
    assert order.indices(0).dtype == np.int64


def test_order_is_a_function_of_step_and_seed():
    """Any step's batch is known without replaying the run (a resume starts mid-epoch)."""
    lengths = random_lengths(50, seed=1)[0]
    sequential = BatchOrder(lengths, 4, seed=3)
    walked = [sequential.indices(s).tolist() for s in range(40)]
    for step in (37, 0, 13, 12, 25, 24):
        assert BatchOrder(lengths, 4, seed=3).indices(step).tolist() == walked[step]
        assert sequential.indices(step).tolist() == walked[step]
    other = [BatchOrder(lengths, 4, seed=4).indices(s).tolist() for s in range(12)]
    assert other != walked[:12] and sorted(other) == sorted(walked[:12])
    assert walked[:12] != walked[12:24]  # epochs are shuffled afresh


def test_too_few_examples():
    with pytest.raises(DataError, match=r"holds 3 examples, fewer than one global batch of 8"):
        BatchOrder([4, 5, 6], 8, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        BatchOrder([4, 5, 6], 3, seed=0).indices(-1)


# -- micro-batches ------------------------------------------------------------------------------------------
def test_pad_widths():
    """Rows padded to one more than a multiple of 32 (mlx-lm's width), never wider than max_seq_length."""
    for longest, cap, width in [(1, 4096, 33), (32, 4096, 33), (33, 4096, 65), (64, 4096, 65), (65, 70, 70)]:
        batch = pad(make_dataset([longest, 2], max_seq_length=cap).examples, cap)
        assert batch.input_ids.shape == (2, width)
        assert batch.lengths.tolist() == [min(longest, cap), 2]
        np.testing.assert_array_equal(batch.input_ids[1], coded_tokens(1, 2) + [0] * (width - 2))


@pytest.mark.parametrize(("micro", "accumulation", "world"), [(2, 3, 1), (1, 2, 3), (3, 1, 2), (2, 2, 2)])
def test_micro_batches_split_the_global_batch(micro, accumulation, world):
    """Rank r takes the r-th contiguous share, cut into accumulation micro-batches in order; every process's
    micro-batches together hold the global batch once, and the counted tokens add up to one big batch's."""
    lengths, offsets = random_lengths(30, seed=micro + 10 * world, high=50)
    dataset = make_dataset(lengths, offsets, max_seq_length=40)
    global_batch = micro * accumulation * world
    indices = BatchOrder(lengths, global_batch, seed=0).indices(1)
    rows, counted = [], 0
    for rank in range(world):
        parts = micro_batches(dataset, indices, micro, rank, world, 40)
        assert len(parts) == accumulation
        for part in parts:
            assert part.input_ids.shape[0] == micro
            expected = pad([dataset.examples[i] for i in rows_of(part)], 40)
            np.testing.assert_array_equal(part.input_ids, expected.input_ids)
            rows += rows_of(part)
            counted += part.token_count()
    assert rows == indices.tolist()
    (whole,) = micro_batches(dataset, indices, global_batch, 0, 1, 40)
    assert counted == whole.token_count()


def test_micro_batches_refuse_a_bad_split():
    dataset = make_dataset([3] * 8)
    with pytest.raises(ValueError, match="does not split"):
        micro_batches(dataset, np.arange(6), 4, 0, 1, 64)
    with pytest.raises(ValueError, match="does not split"):
        micro_batches(dataset, np.arange(6), 1, 0, 4, 64)
    with pytest.raises(ValueError, match="does not split"):
        micro_batches(dataset, np.arange(6), 1, 2, 2, 64)


def test_eval_batches_cover_every_example_once():
    lengths = [3, 50, 7, 2, 9, 30, 4]
    dataset = make_dataset(lengths, max_seq_length=40)
    one = eval_batches(dataset, 3)
    assert [rows_of(b) for b in one] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [b.input_ids.shape[1] for b in one] == [40, 33, 33]  # capped at the data's max_seq_length
    per_rank = [eval_batches(dataset, 2, rank, 3) for rank in range(3)]
    assert [[rows_of(b) for b in batches] for batches in per_rank] == [[[0, 1], [6]], [[2, 3]], [[4, 5]]]
    assert sum(b.token_count() for batches in per_rank for b in batches) == sum(b.token_count() for b in one)
    assert sum(b.token_count() for b in one) == sum(min(n, 40) - 1 for n in lengths)


def test_epoch_of():
    assert [epoch_of(s, 4) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 2.25]
