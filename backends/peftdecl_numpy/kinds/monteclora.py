"""MonteCLoRA (Sengupta et al., 2024) in the NumPy reference: evaluation and merging are LoRA's; in training A is
replaced by A_eff = Σ_n w_n (A + E_nᵀ), a Dirichlet-weighted average of N Gaussian perturbations.

The draws (:mod:`peftdecl.monteclora_math`, shared with the other backends) come from the engine's generator. The
reference runs the training forward; its explicit backward covers A and B (dL/dA = Σ_n w_n · dL/dA_eff) and
refuses a training backward (the sampler priors' gradients): the torch backend takes those by autograd.
"""

from __future__ import annotations

from typing import NoReturn

from peftdecl.errors import PeftdeclError
from peftdecl.monteclora_math import draw_noise, expert_weights, noise_columns
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
        z_mvn, z_wishart, z_dirichlet = draw_noise(layer.rng, o["num_samples"], a.shape[1], lp.r)
        var, noise = noise_columns(to_numpy(p[STD_PRIOR]), z_wishart, z_mvn, o["sample_scaler"])
        weights = expert_weights(to_numpy(p[EXPERT_PRIOR]), z_dirichlet)
        p[VAR_PRIOR][...] = from_host(xp, var, a.dtype)  # HF PEFT keeps the last draw in these buffers
        p[EXPERT_WEIGHTS][...] = from_host(xp, weights, a.dtype)
        w = from_host(xp, weights, a.dtype)
        perturbed = xp.reshape(a.T, (1, *a.T.shape)) + from_host(xp, noise, a.dtype)
        a_eff = xp.sum(xp.reshape(w, (-1, 1, 1)) * perturbed, axis=0).T
        delta, tape = super().delta_record(lp, layer, {**p, "lora_A.weight": a_eff}, x)
        return delta, {**tape, "a_eff": a_eff}

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        if "a_eff" not in tape:  # evaluation: LoRA's gradients; the priors do not enter the output
            dx, grads = super().delta_backward(lp, layer, p, tape, d_delta)
            xp = namespace(p[STD_PRIOR])
            return dx, {
                **grads,
                STD_PRIOR: xp.zeros_like(p[STD_PRIOR]),
                EXPERT_PRIOR: xp.zeros_like(p[EXPERT_PRIOR]),
            }
        raise_priors(lp)


def raise_priors(lp: LayerPlan) -> NoReturn:
    """The reference has no explicit backward through the sampler's priors (the torch backend has, by autograd)."""
    raise PeftdeclError(
        f"{lp.module}: the NumPy reference has no explicit backward through MonteCLoRA's sampler priors in "
        "training; train MonteCLoRA on the torch backend"
    )


OPS = MontecloraOps()
