"""Attaching LoRA to a 32-layer Llama (torch): ``peftdecl.attach`` next to HF PEFT's ``get_peft_model``.

A Llama of 32 decoder layers built from a transformers config with a small width (hidden 64, MLP 128, vocab 256),
so the time is the per-layer work (inventory, planning, wrapping 224 Linears, creating the adapter tensors) rather
than initialising large matrices. LoRA r 16 on q/k/v/o/gate/up/down. Each timed call attaches to a fresh model
built in setup (attaching changes the model; asv runs setup again before every sample, and a sample here is
one call). The plan compilation alone on a 7B-shaped inventory is
``bench_plan.CompilePlan``.
"""

from __future__ import annotations

from typing import Any

from ._peers import SMOKE, require, unsupported

LAYERS = 2 if SMOKE else 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": TARGETS}


def llama(layers: int = LAYERS) -> Any:
    """A random Llama (seed 0) of ``layers`` decoder layers, hidden 64."""
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=256)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


class AttachLlama32:
    """Seconds to attach LoRA to all 224 projections of a 32-layer Llama."""

    params = (["peftdecl", "peft"],)
    param_names = ("implementation",)
    rounds = 1
    number = 1
    repeat = (3, 7, 10.0)
    warmup_time = 0.0
    timeout = 120

    def setup(self, implementation: str) -> None:
        torch = require("torch")
        torch.set_num_threads(2)
        if implementation == "peft":
            peft = require("peft", "HF PEFT")
            self.attach = lambda model: peft.get_peft_model(model, peft.LoraConfig(**LORA))
        else:
            import peftdecl

            self.attach = lambda model: peftdecl.attach(model, {"peft_type": "LORA", **LORA}, seed=0)
        try:
            self.attach(llama(layers=1))
        except Exception as exc:  # an older commit that cannot attach to a transformers Llama
            raise unsupported(f"{implementation} attach to a transformers Llama", exc) from exc
        self.model = llama()
        self.fresh = True

    def time_attach(self, implementation: str) -> None:
        if not self.fresh:  # only when a runner calls twice without setup in between
            self.model = llama()
        self.fresh = False
        self.attach(self.model)
