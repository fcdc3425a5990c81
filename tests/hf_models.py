"""Tiny transformers models built from configs (no hub access) and PEFT helpers for the parity tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

torch = __import__("pytest").importorskip("torch")
transformers = __import__("pytest").importorskip("transformers")
peft = __import__("pytest").importorskip("peft")


SMALL = dict(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)  # Llama's and BERT's


def _seeded(seed: int, model_class: str, config: Any) -> Any:
    """transformers' ``model_class`` built from ``config`` after seeding torch, in eval mode."""
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()


LLAMA_HEADS = {
    "causal": "LlamaForCausalLM",
    "token": "LlamaForTokenClassification",
    "qa": "LlamaForQuestionAnswering",
}


def tiny_llama(seed: int = 0, head: str = "causal", **overrides: Any) -> Any:
    """Hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 128 (the reference page's fixture shape); ``head``
    "causal" (the LM head), "token" (3 labels, a ``score`` Linear) or "qa" (a ``qa_outputs`` Linear to 2)."""
    if head == "token":
        overrides = {"num_labels": 3, **overrides}
    sizes = dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2, vocab_size=128)
    return _seeded(seed, LLAMA_HEADS[head], transformers.LlamaConfig(**{**SMALL, **sizes, **overrides}))


def tiny_gpt2(seed: int = 0) -> Any:
    """GPT-2 with Conv1D projections: 32 wide, 2 layers, 2 heads, vocab 100."""
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return _seeded(seed, "GPT2LMHeadModel", config)


def tiny_t5(seed: int = 0) -> Any:
    """T5 for conditional generation: d_model 32, 2 layers, 4 heads of 8, d_ff 64, vocab 64.

    T5 ties its output to the input embeddings; at this size a freshly initialised model then keeps predicting the
    token it was fed, so the projections are scaled ×4 to make greedy decoding non-trivial."""
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 2)[-2] in ("q", "k", "v", "o", "wi", "wo"):
                param.mul_(4.0)
    return model


BERT_HEADS = {
    "classification": "BertForSequenceClassification",
    "token": "BertForTokenClassification",
    "qa": "BertForQuestionAnswering",
    "none": "BertModel",
}


def tiny_bert(seed: int = 0, head: str = "classification") -> Any:
    """BERT: hidden 32, 2 layers, 4 heads, intermediate 64, vocab 100; ``head`` "classification" (3 labels,
    a ``classifier`` Linear), "token" (3 labels per token, a ``classifier`` Linear), "qa" (a ``qa_outputs``
    Linear to 2: start and end) or "none" (the bare BertModel with its pooler)."""
    sizes = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_labels=2 if head == "qa" else 3)
    return _seeded(seed, BERT_HEADS[head], transformers.BertConfig(**SMALL, **sizes))


def numpy_inputs(model: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict, keyword arguments) for peftdecl's NumPy backend from a torch model."""
    from peftdecl_torch.inventory import numpy_model

    state, layer_types, facts = numpy_model(model)
    return state, {"layer_types": layer_types, **facts}


def peft_model(base: Any, config: Any, adapter: str = "default") -> Any:
    """``get_peft_model`` with a fixed seed so adapters are reproducible."""
    torch.manual_seed(1234)
    return peft.get_peft_model(base, config, adapter_name=adapter)


def merged_state(peft_wrapped: Any) -> dict[str, np.ndarray]:
    """PEFT's merge_and_unload, as float64 arrays."""
    merged = peft_wrapped.merge_and_unload()
    return {k: v.detach().double().numpy() for k, v in merged.state_dict().items()}


def perturb(peft_wrapped: Any, seed: int = 7, scale: float = 0.05) -> None:
    """Give every adapter tensor non-trivial values (PEFT's zero-initialised B would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_wrapped.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=gen).to(param.device))


class Layers(torch.nn.Module):
    """A bare torch module holding the layers ``build()`` returns by name, created after seeding torch with 0 so
    every instance has the same weights (a custom, non-transformers base for PEFT)."""

    def __init__(self, build: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        torch.manual_seed(0)
        for name, layer in build().items():
            self.add_module(name, layer)
