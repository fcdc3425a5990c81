"""AdaLoRA's rank allocator (HF PEFT's RankAllocator and AdaLoraModel.update_and_allocate), on any array namespace.

Sensitivity I = |p ⊙ ∇p|, smoothed Ī ← β1 Ī + (1−β1) I, uncertainty Ū ← β2 Ū + (1−β2) |I − Ī|,
element score Ī ⊙ Ū; the score of triplet i is s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki).
The budget (total kept triplets) falls from Σ init_r to target_r · #layers: b(t) = init for t ≤ tinit,
target for t > T − tfinal, else ⌊(init − target)(1 − (t − tinit)/(T − tfinal − tinit))³ + target⌋.
Every deltaT steps the triplets scoring at or below the (init − b)-th smallest score get Λ_i = 0.
At t = T − tfinal the mask is final; later steps re-apply it.

The scores are kept in the parameters' own namespace, device and dtype (NumPy, torch through array_api_compat,
CuPy ...): a step reads the live arrays and their gradients where they are. Only the kept-triplet masks, a few
booleans per layer, come to the host at a masking step (they are the ``rank_pattern`` a config saves).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import array_api_compat
import numpy as np

from peftdecl.plan import Plan
from peftdecl.plan.kinds.adalora import E_SUFFIX, NAMES, kept_masks
from peftdecl.spec.adalora import AdaLoraSpec
from peftdecl_numpy.xp_ops import Array, namespace, to_numpy

RankPattern = dict[str, list[bool]]


class RankAllocator:
    """Importance-driven pruning of one AdaLoRA adapter's triplets, step for step like HF PEFT.

    Triplets outside the plan's rank mask (a pruned file) are not candidates, as they do not exist in the
    pruned modules PEFT loads; the masks returned always have init_r entries. Where PEFT crashes because
    nothing is left to prune (``torch.kthvalue`` with k ≤ 0, e.g. target_r ≥ init_r), nothing is pruned.
    """

    def __init__(self, plan: Plan) -> None:
        spec = cast(AdaLoraSpec, plan.spec)
        if plan.kind != "adalora":
            raise ValueError(f"RankAllocator needs an AdaLoRA plan, got kind {plan.kind!r}")
        for field in ("beta1", "beta2"):
            value = getattr(spec, field)
            if not 0.0 < value < 1.0:
                raise ValueError(f"RankAllocator: {field} must lie strictly between 0 and 1, got {value}")
        self.plan = plan
        self.beta1, self.beta2 = float(spec.beta1), float(spec.beta2)
        if spec.total_step is None:  # the spec's own check refuses this; kept for the type checker
            raise ValueError("RankAllocator needs an AdaLoRA spec with total_step")
        self.total_step, self.tinit, self.tfinal, self.delta_t = (
            spec.total_step,
            spec.tinit,
            spec.tfinal,
            spec.deltaT,
        )
        self.kept = dict(kept_masks(plan))
        self.init_bgt = int(sum(mask.sum() for mask in self.kept.values()))
        self.target_bgt = spec.target_r * len(plan.layers)
        self.rank_pattern: RankPattern | None = (
            None
            if spec.rank_pattern is None
            else {m + E_SUFFIX: mask.tolist() for m, mask in self.kept.items()}
        )
        """The latest mask, keyed ``<module>.lora_E`` as HF PEFT saves ``rank_pattern``."""
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the smoothed sensitivities and uncertainties."""
        self.ipt: dict[str, Array] = {}
        self.exp_avg_ipt: dict[str, Array] = {}
        self.exp_avg_unc: dict[str, Array] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether this step masks) for a step of the reduction schedule."""
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_step - self.tfinal:
            return self.target_bgt, True
        decay = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (decay**3) + self.target_bgt)
        return budget, step % self.delta_t == 0

    def update_and_allocate(
        self, step: int, params: Mapping[str, Array], grads: Mapping[str, Array]
    ) -> tuple[int, RankPattern | None]:
        """One call per training step, after the backward pass: (budget, the mask applied or None).

        ``params`` are the live arrays by full key, of any array-API namespace (torch tensors: detached views,
        under ``torch.no_grad()``), and ``grads`` their gradients; masked lora_E entries are set to zero in place.
        """
        final = self.total_step - self.tfinal
        if step < final:
            self._update_ipt(params, grads)
            budget, due = self.budget_schedule(step)
            if not due:
                return budget, None
            self.rank_pattern = self._mask_to_budget(params, budget)
            return budget, self.rank_pattern
        if step == final:
            budget, _ = self.budget_schedule(step)
            self.rank_pattern = self._mask_to_budget(params, budget)
            self.reset_ipt()
            return budget, self.rank_pattern
        if self.rank_pattern is None:
            raise ValueError(
                f"RankAllocator: step {step} is past total_step - tfinal = {final}, "
                f"but no mask was ever allocated; call update_and_allocate at step {final} first"
            )
        self._apply(params, self.rank_pattern)
        return self.target_bgt, self.rank_pattern

    # -- steps ---------------------------------------------------------------------------------------------
    def _update_ipt(self, params: Mapping[str, Array], grads: Mapping[str, Array]) -> None:
        for lp in self.plan.layers:
            for name in NAMES:
                key = lp.key(name)
                for given, what in ((params, "params"), (grads, "grads")):
                    if key not in given:
                        raise KeyError(f"RankAllocator.update_and_allocate: {what} has no entry {key}")
                xp = namespace(params[key], grads[key])
                ipt = xp.abs(params[key] * grads[key])
                avg = self.exp_avg_ipt.get(key, xp.zeros_like(ipt))
                unc = self.exp_avg_unc.get(key, xp.zeros_like(ipt))
                avg = self.beta1 * avg + (1 - self.beta1) * ipt
                self.ipt[key] = ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = self.beta2 * unc + (1 - self.beta2) * xp.abs(ipt - avg)

    def _score(self, key: str) -> Array:
        if key not in self.exp_avg_ipt:
            raise ValueError(f"RankAllocator: no importance scores for {key} yet; run an earlier step first")
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self) -> dict[str, Array]:
        """Module -> score of each of its init_r triplets (in the parameters' namespace)."""
        out = {}
        for lp in self.plan.layers:
            e, a, b = (self._score(lp.key(name)) for name in ("lora_E", "lora_A", "lora_B"))
            xp = namespace(e, a, b)
            out[lp.module] = xp.reshape(e, (-1,)) + (xp.mean(a, axis=1) + xp.mean(b, axis=0))
        return out

    def _mask_to_budget(self, params: Mapping[str, Array], budget: int) -> RankPattern:
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        pattern = {}
        candidates = [self._kept_scores(module, score) for module, score in scores.items()]
        size = sum(int(c.shape[0]) for c in candidates)
        if 0 < k <= size:
            xp = namespace(*candidates)
            threshold = xp.sort(xp.concat(candidates))[k - 1]
            for module, score in scores.items():
                pruned = to_numpy(score <= threshold)  # the host copy of r booleans: the rank pattern
                pattern[module + E_SUFFIX] = (self.kept[module] & ~pruned).tolist()
        else:  # nothing to prune (PEFT's kthvalue would fail here)
            pattern = {module + E_SUFFIX: self.kept[module].tolist() for module in scores}
        self._apply(params, pattern)
        return pattern

    def _kept_scores(self, module: str, score: Array) -> Array:
        xp = namespace(score)
        index = np.flatnonzero(self.kept[module])
        device = array_api_compat.device(score)
        return xp.take(score, xp.asarray(index, dtype=xp.int64, device=device), axis=0)

    def _apply(self, params: Mapping[str, Array], pattern: RankPattern) -> None:
        for lp in self.plan.layers:
            e = params[lp.key("lora_E")]
            xp = namespace(e)
            keep = [bool(v) for v in pattern[lp.module + E_SUFFIX]]
            mask = xp.reshape(xp.asarray(keep, device=array_api_compat.device(e)), (-1, *(1,) * (e.ndim - 1)))
            e[...] = xp.where(mask, e, xp.zeros_like(e))
