"""Generate docs/capabilities.md from the kind registry and each installed backend's static Capabilities record.

Run as a script (``python docs/gen_capabilities.py``) or as a mkdocs hook (listed under ``hooks:`` in mkdocs.yml).
Reading Capabilities imports no heavy library, so the page builds without torch or MLX installed; a backend that
is not installed is listed with the reason. The kinds (rows) and layer types (columns) are those of
:mod:`peftdecl.kinds`, so a newly declared kind appears here without editing this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "capabilities.md"


def render() -> str:
    """The page text."""
    import peftdecl
    from peftdecl.kinds import kinds
    from peftdecl.plan import LAYER_TYPES

    declared = kinds()
    entries = peftdecl.backends()
    # the IR's layer types, then any a kind declares beyond them ("parameter": target_parameters)
    columns = list(LAYER_TYPES)
    columns += sorted({t for d in declared.values() for t in d.layer_types} - set(LAYER_TYPES))
    lines = [
        "# Backend capabilities",
        "",
        "Generated from the kind registry (`peftdecl.kinds`) and each backend's `Capabilities` record",
        "(`peftdecl.backends()`); tests skip, with this reason, whatever a backend does not list.",
        "",
        "## Kinds",
        "",
        "| kind | peft_type | layer types | composes by | what it computes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for decl in declared.values():
        layers = ", ".join(decl.layer_types) or "model-level"
        lines.append(f"| {decl.name} | {decl.peft_type} | {layers} | {decl.composition} | {decl.summary} |")
    lines.append("")
    for name, entry in entries.items():
        caps = entry.capabilities
        lines += [f"## {name}", ""]
        if caps is None:
            lines += [f"Not loadable here: {entry.reason}", ""]
            continue
        lines += [
            f"- gradients: {caps.gradients}",
            f"- devices: {', '.join(caps.devices)}; dtypes: {', '.join(caps.dtypes)}",
            f"- mixed batches (`adapter_names=`): {_list(caps.mixed_batch)}",
            f"- several active adapters on one layer: {_list(caps.multi_active)}",
            f"- requires: {_list(caps.requires)}",
            f"- quantised base layers: {_list(caps.quantizations)}"
            + ("; weight-reading kinds dequantise them on the fly" if caps.dequantizes else ""),
            "",
            "| kind | " + " | ".join(columns) + " |",
            "| --- | " + " | ".join("---" for _ in columns) + " |",
        ]
        for kind, decl in declared.items():
            if decl.model_level:
                cells = ["model-level" if caps.supports(kind) else "—"] + [""] * (len(columns) - 1)
            else:
                cells = ["✓" if caps.supports(kind, layer) else "—" for layer in columns]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += NOT_SUPPORTED
    return "\n".join(lines)


NOT_SUPPORTED = [
    "## What HF PEFT 0.21 has for these kinds and peftdecl does not",
    "",
    "- `megatron_config` / `megatron_core` (LoRA on Megatron tensor-parallel layers): a distributed-training",
    "  integration, refused with the field named.",
    "- Quantised bases other than bitsandbytes 4/8-bit (torch) and MLX affine: GPTQ, AWQ, AQLM, EETQ, HQQ, torchao,",
    "  INC, TransformerEngine. `use_qalora` pools the adapter input only on GPTQ layers in PEFT, so without them it",
    "  is plain LoRA in both libraries.",
    "- Transposed convolutions: PEFT adapts none with these kinds, and neither does peftdecl.",
    "- Per backend, the tables above say which kind runs on which layer type; a missing entry is refused with the",
    "  reason (`layer_replication` runs on torch and MLX, `ensure_weight_tying` on torch, `target_parameters` on",
    "  torch and the NumPy reference).",
    "",
]
"""Stated once here so that the page says plainly what is left out, and why."""


def _list(values: Any) -> str:
    return ", ".join(values) if values else "none"


def write() -> None:
    text = render()
    if not OUTPUT.is_file() or OUTPUT.read_text(encoding="utf-8") != text:
        OUTPUT.write_text(text, encoding="utf-8")


def on_pre_build(config: Any, **kwargs: Any) -> None:
    """mkdocs hook: regenerate the page before the docs are collected."""
    write()


if __name__ == "__main__":
    write()
