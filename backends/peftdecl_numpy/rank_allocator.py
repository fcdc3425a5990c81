"""AdaLoRA's rank allocator (HF PEFT's RankAllocator and AdaLoraModel.update_and_allocate), in NumPy.

Sensitivity I = |p ⊙ ∇p|, smoothed Ī ← β1 Ī + (1−β1) I, uncertainty Ū ← β2 Ū + (1−β2) |I − Ī|,
element score Ī ⊙ Ū; the score of triplet i is s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki).
The budget (total kept triplets) falls from Σ init_r to target_r · #layers: b(t) = init for t ≤ tinit,
target for t > T − tfinal, else ⌊(init − target)(1 − (t − tinit)/(T − tfinal − tinit))³ + target⌋.
Every deltaT steps the triplets scoring at or below the (init − b)-th smallest score get Λ_i = 0.
At t = T − tfinal the mask is final; later steps re-apply it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from peftdecl.plan import Plan
from peftdecl.plan.kinds.adalora import E_SUFFIX, NAMES, kept_masks

RankPattern = dict[str, list[bool]]


class RankAllocator:
    """Importance-driven pruning of one AdaLoRA adapter's triplets, step for step like HF PEFT.

    Triplets outside the plan's rank mask (a pruned file) are not candidates, as they do not exist in the
    pruned modules PEFT loads; the masks returned always have init_r entries. Where PEFT crashes because
    nothing is left to prune (``torch.kthvalue`` with k ≤ 0, e.g. target_r ≥ init_r), nothing is pruned.
    """

    def __init__(self, plan: Plan) -> None:
        spec = plan.spec
        if plan.kind != "adalora":
            raise ValueError(f"RankAllocator needs an AdaLoRA plan, got kind {plan.kind!r}")
        for field in ("beta1", "beta2"):
            value = getattr(spec, field)
            if not 0.0 < value < 1.0:
                raise ValueError(f"RankAllocator: {field} must lie strictly between 0 and 1, got {value}")
        self.plan = plan
        self.beta1, self.beta2 = float(spec.beta1), float(spec.beta2)
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
        self.ipt: dict[str, np.ndarray] = {}
        self.exp_avg_ipt: dict[str, np.ndarray] = {}
        self.exp_avg_unc: dict[str, np.ndarray] = {}

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
        self, step: int, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]
    ) -> tuple[int, RankPattern | None]:
        """One call per training step, after the backward pass: (budget, the mask applied or None).

        ``params`` are the live arrays (full keys); masked lora_E entries are set to zero in place.
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
    def _update_ipt(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        for lp in self.plan.layers:
            for name in NAMES:
                key = lp.key(name)
                for given, what in ((params, "params"), (grads, "grads")):
                    if key not in given:
                        raise KeyError(f"RankAllocator.update_and_allocate: {what} has no entry {key}")
                ipt = np.abs(np.asarray(params[key], np.float64) * np.asarray(grads[key], np.float64))
                avg = self.exp_avg_ipt.get(key, np.zeros_like(ipt))
                unc = self.exp_avg_unc.get(key, np.zeros_like(ipt))
                avg = self.beta1 * avg + (1 - self.beta1) * ipt
                self.ipt[key] = ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = self.beta2 * unc + (1 - self.beta2) * np.abs(ipt - avg)

    def _score(self, key: str) -> np.ndarray:
        if key not in self.exp_avg_ipt:
            raise ValueError(f"RankAllocator: no importance scores for {key} yet; run an earlier step first")
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self) -> dict[str, np.ndarray]:
        """Module -> score of each of its init_r triplets."""
        return {
            lp.module: self._score(lp.key("lora_E")).reshape(-1)
            + (self._score(lp.key("lora_A")).mean(axis=1) + self._score(lp.key("lora_B")).mean(axis=0))
            for lp in self.plan.layers
        }

    def _mask_to_budget(self, params: Mapping[str, np.ndarray], budget: int) -> RankPattern:
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        candidates = np.concatenate([scores[m][self.kept[m]] for m in scores])
        threshold = np.partition(candidates, k - 1)[k - 1] if 0 < k <= candidates.size else -np.inf
        pattern = {}
        for module, score in scores.items():
            keep = self.kept[module] & ~(score <= threshold)
            pattern[module + E_SUFFIX] = keep.tolist()
        self._apply(params, pattern)
        return pattern

    def _apply(self, params: Mapping[str, np.ndarray], pattern: RankPattern) -> None:
        for lp in self.plan.layers:
            keep = np.asarray(pattern[lp.module + E_SUFFIX], dtype=bool)
            params[lp.key("lora_E")][~keep] = 0.0
