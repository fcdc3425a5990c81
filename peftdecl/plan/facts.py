"""Model facts read from a model's configuration object, whatever framework built it.

A transformers ``PretrainedConfig`` and an mlx-lm ``ModelArgs`` name the same facts, under the keys their model
families chose (GPT-2's ``n_layer``, T5's ``d_model``, ...); this module reads them with ``getattr`` into the
:class:`~peftdecl.plan.ir.ModelInfo` fields, with no framework import.
"""

from __future__ import annotations

SIZE_KEYS: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "vocab_size": ("vocab_size",),
}
"""ModelInfo size field -> the config attributes that may hold it; the first one holding an int wins."""


def config_facts(config: object, text: object) -> dict[str, str | int | None]:
    """The ModelInfo fields a config object provides: ``model_type`` from ``config`` (None when absent), and every
    field of :data:`SIZE_KEYS` that one of its attributes of ``text`` holds as an int (``text`` is the config's
    text part: ``config`` itself, or a multimodal config's text config). A size no attribute holds is left out."""
    facts: dict[str, str | int | None] = {"model_type": getattr(config, "model_type", None)}
    for field, keys in SIZE_KEYS.items():
        for key in keys:
            value = getattr(text, key, None)
            if isinstance(value, int):
                facts[field] = int(value)
                break
    return facts
