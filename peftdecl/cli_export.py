"""``peftdecl export``: an adapter with its base model, written as a merged safetensors checkpoint, a merged ONNX
graph, or a llama.cpp GGUF LoRA adapter (:mod:`peftdecl.export`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from peftdecl.errors import PeftdeclError
from peftdecl.export import FORMATS


def add_export_command(sub: argparse._SubParsersAction) -> None:
    """Register ``export`` on the ``peftdecl`` parser."""
    export = sub.add_parser(
        "export",
        help="write a model with its adapter for other runtimes: merged safetensors, merged ONNX, or a GGUF "
        "LoRA adapter for llama.cpp",
    )
    export.add_argument("--model", required=True, type=Path, help="base model folder (HF checkpoint)")
    export.add_argument(
        "--adapter", required=True, type=Path, help="adapter folder (HF PEFT, mlx-lm or native)"
    )
    export.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    export.add_argument(
        "--out", required=True, type=Path, help="new path: a folder (safetensors) or a file (.onnx, .gguf)"
    )
    export.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="safetensors only"
    )
    export.add_argument("--backend", choices=("torch", "mlx"), default=None)
    export.set_defaults(run=_export, dequantize=False)


def _export(args: argparse.Namespace) -> int:
    from peftdecl import cli_model

    if args.format == "safetensors":
        return cli_model.run_merge(args)  # the merge command's own path: one merged-checkpoint writer
    if args.dtype is not None:
        raise PeftdeclError(f"--dtype applies to --format safetensors; {args.format} is written in float32")
    if not args.adapter.is_dir():
        raise PeftdeclError(f"--adapter {args.adapter}: not a folder")
    if args.format == "onnx":
        return _onnx(args)
    return _gguf(args)


def _onnx(args: argparse.Namespace) -> int:
    from peftdecl import cli_model
    from peftdecl.export.onnx import export_onnx, external_data_name
    from peftdecl.export.staging import check_new_files

    check_new_files([args.out, args.out.parent / external_data_name(args.out)])  # before the slow load
    args.backend = args.backend or "torch"  # the exporter is torch's, whatever the platform's default backend
    _, model, _ = cli_model.load_model_and_adapter(args, device="cpu")
    error = export_onnx(model.backend, model, args.out)
    print(
        f"exported {args.adapter} merged into {args.model}: {args.out} (onnxruntime vs model logits: {error:.2e})"
    )
    return 0


def _gguf(args: argparse.Namespace) -> int:
    from peftdecl import cli_model
    from peftdecl.export.gguf import base_config, gguf_adapter, llama_cpp_architecture, write_gguf_adapter
    from peftdecl.export.staging import check_new_files

    config = base_config(args.model)
    llama_cpp_architecture(config)  # refuse an unsupported base before loading it
    check_new_files([args.out])
    _, model, _ = cli_model.load_model_and_adapter(args, device="cpu")
    adapter = gguf_adapter(model, config)
    write_gguf_adapter(adapter, args.out, title=args.adapter.name)
    print(
        f"exported {args.adapter} as a llama.cpp GGUF LoRA adapter: {args.out} ({len(adapter.tensors)} tensors)"
    )
    for module, ratio in adapter.folded.items():
        print(f"  {module}: scaling differs from alpha/r; lora_b holds the factor {ratio:.6g}")
    return 0
