"""MonteCLoRA (Sengupta et al., 2024) in the NumPy reference: evaluation and merging are LoRA's; in training A is
replaced by A_eff = Σ_n w_n (A + E_nᵀ), a Dirichlet-weighted average of N Gaussian perturbations.

The draws come from the engine's generator; the math, the training backward through the noise and the sample
weights included, is :mod:`peftdecl.monteclora_math` (host NumPy: the sampler's tensors are r- and N-long).
"""

from __future__ import annotations

import numpy as np

from peftdecl.monteclora_math import draw_noise, expert_weights, noise_columns, perturbed_a_grads
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.monteclora import EXPERT_PRIOR, EXPERT_WEIGHTS, STD_PRIOR, VAR_PRIOR
from peftdecl_numpy.kinds.base import Params, Tape
from peftdecl_numpy.kinds.lora import LoraOps
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.xp_ops import Array, from_host, namespace, to_numpy


class MontecloraOps(LoraOps):
    kind = "monteclora"

    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        if not layer.training:
            return super().delta_record(lp, layer, p, x)
        a = p["lora_A.weight"]
        xp = namespace(a)
        o = lp.options
        draws = draw_noise(layer.rng, o["num_samples"], a.shape[1], lp.r)
        z_mvn, z_wishart, z_dirichlet = draws
        var, noise = noise_columns(to_numpy(p[STD_PRIOR]), z_wishart, z_mvn, o["sample_scaler"])
        weights = expert_weights(to_numpy(p[EXPERT_PRIOR]), z_dirichlet)
        p[VAR_PRIOR][...] = from_host(xp, var, a.dtype)  # HF PEFT keeps the last draw in these buffers
        p[EXPERT_WEIGHTS][...] = from_host(xp, weights, a.dtype)
        a_eff_t = np.einsum("n,nij->ij", weights, to_numpy(a).T[None] + noise)
        a_eff = from_host(xp, a_eff_t.T, a.dtype)
        delta, tape = super().delta_record(lp, layer, {**p, "lora_A.weight": a_eff}, x)
        return delta, {**tape, "a_eff": a_eff, "draws": draws}

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        if "a_eff" not in tape:  # evaluation: LoRA's gradients; the priors do not enter the output
            dx, grads = super().delta_backward(lp, layer, p, tape, d_delta)
            xp = namespace(p[STD_PRIOR])
            zeros = {name: xp.zeros_like(p[name]) for name in (STD_PRIOR, EXPERT_PRIOR)}
            return dx, {**grads, **zeros}
        dx, grads = super().delta_backward(lp, layer, {**p, "lora_A.weight": tape["a_eff"]}, tape, d_delta)
        a = p["lora_A.weight"]
        d_a, d_std, d_expert = perturbed_a_grads(
            to_numpy(a),
            to_numpy(grads["lora_A.weight"]),
            to_numpy(p[STD_PRIOR]),
            to_numpy(p[EXPERT_PRIOR]),
            tape["draws"],
            lp.options["sample_scaler"],
        )
        xp = namespace(a)
        host = {"lora_A.weight": d_a, STD_PRIOR: d_std, EXPERT_PRIOR: d_expert}
        return dx, {**grads, **{k: from_host(xp, v, a.dtype) for k, v in host.items()}}


OPS = MontecloraOps()
