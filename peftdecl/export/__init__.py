"""``peftdecl export``: an adapted model written for other runtimes.

``safetensors`` is the merged transformers checkpoint (the path ``peftdecl merge`` takes), ``onnx`` the merged causal
LM as one ONNX graph (input_ids -> logits) checked with onnxruntime, ``gguf`` the LoRA adapter itself in llama.cpp's
GGUF adapter layout. Each format is one module here; none imports torch at module level.
"""

from __future__ import annotations

FORMATS: tuple[str, ...] = ("safetensors", "onnx", "gguf")
"""What ``peftdecl export --format`` accepts."""

__all__ = ["FORMATS"]
