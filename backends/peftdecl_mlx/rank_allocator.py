"""AdaLoRA's rank allocator on MLX arrays: :class:`peftdecl_numpy.rank_allocator.RankAllocator` run on the
``mx.array`` tensors themselves (``mlx.core`` serves as their array namespace), no copy to NumPy per step.

MLX arrays carry no array-API ``device`` and ``mx.asarray`` takes none, so the two steps that build index and
mask arrays are written here without one. Masked singular values are set to zero in place (``e[...] = ...``
keeps the array object), so ``params`` must be the arrays the model holds now:
``engine.trainable_parameters(names)`` read after the optimizer step.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from peftdecl.plan.kinds.adalora import E_SUFFIX
from peftdecl_numpy.rank_allocator import RankAllocator, RankPattern


class MlxRankAllocator(RankAllocator):
    """HF PEFT's RankAllocator step for step, on ``mx.array`` parameters and gradients."""

    def _kept_scores(self, module: str, score: mx.array) -> mx.array:
        return mx.take(score, mx.array(np.flatnonzero(self.kept[module])), axis=0)

    def _apply(self, params: Mapping[str, mx.array], pattern: RankPattern) -> None:
        for lp in self.plan.layers:
            e = params[lp.key("lora_E")]
            keep = mx.array([bool(v) for v in pattern[lp.module + E_SUFFIX]]).reshape(
                -1, *(1,) * (e.ndim - 1)
            )
            e[...] = mx.where(keep, e, mx.zeros_like(e))
