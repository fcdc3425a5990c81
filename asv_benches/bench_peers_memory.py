"""Peak resident memory of a training step, peftdecl next to HF PEFT (asv ``peakmem_*``: the whole process's
peak resident set, in bytes, imports and setup included).

Both sides import the same modules (torch, transformers, PEFT, bitsandbytes where used, peftdecl's torch
backend) before they build anything, so the imports add the same amount to both and the difference is the
layers and the step.

    DoraPeakMemory    one DoRA Linear 1024×1024 (r 16), 2048 tokens, forward + backward
    QloraPeakMemory   a 2-layer Llama (hidden 256, MLP 1024, vocab 4096) loaded as 4-bit NF4 through transformers'
                      BitsAndBytesConfig (double quantisation, float32 compute), LoRA r 16 on q/k/v/o/gate/up/down,
                      two AdamW steps on 256 random tokens; skipped where bitsandbytes is not installed
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._peers import SMOKE, require, torch_calls, torch_layer, unsupported

IMPLEMENTATIONS = ("peftdecl", "peft")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA = {"hidden_size": 64 if SMOKE else 256, "intermediate_size": 128 if SMOKE else 1024,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
         "vocab_size": 512 if SMOKE else 4096, "max_position_embeddings": 1024}  # fmt: skip
SEQ = 32 if SMOKE else 256
FOLDER = "qlora-llama"


def _same_imports(*extra: str) -> Any:
    """Import what both sides import (see the module docstring); return torch."""
    torch = require("torch")
    require("transformers")
    require("peft", "HF PEFT")
    for name in extra:
        require(name)
    require("peftdecl_torch", "peftdecl's torch backend")
    torch.set_num_threads(2)
    return torch


class DoraPeakMemory:
    """Peak resident bytes of a process that builds one DoRA layer and runs one forward + backward."""

    params = (list(IMPLEMENTATIONS),)
    param_names = ("implementation",)
    timeout = 120

    def setup(self, implementation: str) -> None:
        _same_imports()
        dim, tokens = (64, 32) if SMOKE else (1024, 2048)
        self.step = torch_calls(torch_layer("dora", implementation, dim), tokens, dim)["forward_backward"]

    def peakmem_forward_backward(self, implementation: str) -> None:
        self.step()


def write_model(folder: Path) -> None:
    """A random Llama (seed 0) of shape LLAMA saved with transformers, once per run."""
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LLAMA, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


class QloraPeakMemory:
    """Peak resident bytes of a process that loads the 4-bit model, attaches LoRA and runs two AdamW steps."""

    params = (list(IMPLEMENTATIONS),)
    param_names = ("implementation",)
    timeout = 300

    def setup_cache(self) -> str:
        try:
            require("bitsandbytes")
            write_model(Path(FOLDER))
        except NotImplementedError as exc:
            return str(exc)
        return ""

    def setup(self, missing: str, implementation: str) -> None:
        if missing:
            raise NotImplementedError(missing)
        torch = _same_imports("bitsandbytes")
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantized = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(
            os.path.abspath(FOLDER), quantization_config=quantized, dtype=torch.float32, device_map="cpu"
        )
        model.config.use_cache = False
        lora = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": list(TARGETS)}
        if implementation == "peft":
            import peft

            trained: Any = peft.get_peft_model(model, peft.LoraConfig(**lora))
            params = [p for p in trained.parameters() if p.requires_grad]
        else:
            import peftdecl

            try:
                trained = peftdecl.attach(model, {"peft_type": "LORA", **lora}, seed=0)
                params = list(trained.trainable_parameters().values())
            except Exception as exc:
                raise unsupported("peftdecl over a bitsandbytes 4-bit model", exc) from exc
        trained.train()
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        ids = torch.randint(4, LLAMA["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(0))

        def step() -> None:
            trained(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        self.step = step

    def peakmem_training_step(self, missing: str, implementation: str) -> None:
        self.step()
        self.step()
