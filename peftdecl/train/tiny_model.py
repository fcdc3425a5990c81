"""A tiny Llama checkpoint folder built locally (no download): config, random weights, a character tokenizer.

transformers (``AutoModelForCausalLM``/``AutoTokenizer``) and mlx-lm (``mlx_lm.load``) both load the folder. The
weights are written with NumPy and safetensors and the tokenizer with ``tokenizers``, so no framework is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
"""Ids 0–3: padding, beginning and end of sequence, unknown."""
DEFAULT_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"
"""Printable ASCII and newline: one token per character."""


def llama_config(
    vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int
) -> dict[str, object]:
    """A LlamaForCausalLM ``config.json`` for the given sizes (untied head, RoPE θ 10000, max 1024 positions)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def llama_weights(config: dict[str, object], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights (normal, std 0.02; norms 1) under LlamaForCausalLM's parameter names."""
    rng = np.random.default_rng(seed)
    vocab, hidden = int(config["vocab_size"]), int(config["hidden_size"])  # type: ignore[call-overload]
    inter, heads = int(config["intermediate_size"]), int(config["num_attention_heads"])  # type: ignore[call-overload]
    kv = hidden // heads * int(config["num_key_value_heads"])  # type: ignore[call-overload]

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for i in range(int(config["num_hidden_layers"])):  # type: ignore[call-overload]
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": normal(hidden, hidden),
            p + "self_attn.k_proj.weight": normal(kv, hidden),
            p + "self_attn.v_proj.weight": normal(kv, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, hidden),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
        }
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    weights["lm_head.weight"] = normal(vocab, hidden)
    return weights


def write_char_tokenizer(folder: Path, alphabet: str = DEFAULT_ALPHABET) -> int:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for a one-token-per-character tokenizer (no BOS
    added; ``</s>`` is EOS, ``<pad>`` is id 0); return its vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in dict.fromkeys(alphabet):
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")})
        + "\n"
    )
    return len(vocab)


def build_tiny_llama(
    folder: str | Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    alphabet: str = DEFAULT_ALPHABET,
    seed: int = 0,
) -> Path:
    """Create ``folder`` holding a random tiny Llama with a character tokenizer; return the folder."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_char_tokenizer(folder, alphabet)
    config = llama_config(vocab_size, hidden, layers, heads, kv_heads, intermediate)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(llama_weights(config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
