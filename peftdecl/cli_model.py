"""The ``peftdecl`` subcommands that run a model: ``train``, ``merge``, ``generate`` (and ``quantize``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from peftdecl.cli_export import add_export_command
from peftdecl.cli_quantize import add_quantize_command
from peftdecl.errors import PeftdeclError

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel
    from peftdecl.train.runtime import TrainingBackend

DTYPES = ("float32", "bfloat16", "float16")


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``train``, ``merge``, ``generate`` and ``quantize`` on the ``peftdecl`` parser."""
    train = sub.add_parser(
        "train", help="fine-tune an adapter from a training file (or an mlx_lm.lora config)"
    )
    train.add_argument("file", type=Path, help="training file (YAML or JSON)")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT_DIR",
        help="continue from output_dir's latest checkpoint, or from the folder given",
    )
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field by its dotted path, e.g. training.max_steps=5 (value read as YAML)",
    )
    train.set_defaults(run=_train)

    merge = sub.add_parser("merge", help="fold an adapter into its base model and save the merged checkpoint")
    merge.add_argument("--model", required=True, type=Path, help="base model folder (HF checkpoint)")
    merge.add_argument(
        "--adapter", required=True, type=Path, help="adapter folder (HF PEFT, mlx-lm or native)"
    )
    merge.add_argument("--out", required=True, type=Path, help="new folder for the merged model")
    merge.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the saved weights")
    merge.add_argument("--backend", choices=("torch", "mlx"), default=None)
    merge.add_argument(
        "--dequantize",
        action="store_true",
        help="a quantised base is written as float weights (default: re-quantised, as it was loaded)",
    )
    merge.set_defaults(run=run_merge)
    add_export_command(sub)

    generate = sub.add_parser("generate", help="greedy generation from a model, optionally with an adapter")
    generate.add_argument("--model", required=True, type=Path, help="base model folder (HF checkpoint)")
    generate.add_argument("--adapter", type=Path, default=None, help="adapter folder")
    generate.add_argument("--prompt", required=True, help="prompt text")
    generate.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default 64)")
    generate.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template"
    )
    generate.add_argument("--backend", choices=("torch", "mlx"), default=None)
    generate.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    generate.set_defaults(run=_generate)
    add_quantize_command(sub)


def _train(args: argparse.Namespace) -> int:
    from peftdecl.train.loop import run_from_file

    summary = run_from_file(args.file, args.overrides, args.resume)
    return 0 if summary.steps > 0 else 1


def load_model_and_adapter(
    args: argparse.Namespace, device: str = "auto"
) -> tuple[TrainingBackend, AdaptedModel, Any]:
    """``args.model`` (an HF checkpoint folder) on ``args.backend`` with ``args.adapter`` loaded as ``default``, in
    eval mode: the backend, the adapted model and the tokenizer (shared by merge, generate and export)."""
    from peftdecl.backend import get_backend
    from peftdecl.model import AdaptedModel
    from peftdecl.train.runtime import TrainingBackend
    from peftdecl.train.setup import default_backend

    if not (args.model / "config.json").is_file():
        raise PeftdeclError(f"--model {args.model}: no config.json there (expected a HF checkpoint folder)")
    if args.adapter is not None and not args.adapter.is_dir():
        raise PeftdeclError(f"--adapter {args.adapter}: not a folder")
    backend = get_backend(args.backend or default_backend())
    if not isinstance(backend, TrainingBackend):
        raise PeftdeclError(f"backend {backend.name!r} cannot load HF checkpoints")
    base, tokenizer = backend.load_pretrained(args.model, device=device, dtype="float32")
    model = AdaptedModel.create(backend, base)
    if args.adapter is not None:
        model.load_adapter(args.adapter, "default")
        model.set_adapter("default")
    model.eval()
    return cast("TrainingBackend", backend), model, tokenizer


def run_merge(args: argparse.Namespace) -> int:
    if args.adapter is None:
        raise PeftdeclError("--adapter is required")
    backend, model, tokenizer = load_model_and_adapter(args, device="cpu")
    backend.save_merged(model, tokenizer, args.model, args.out, args.dtype, dequantize=args.dequantize)
    print(f"merged {args.adapter} into {args.model}: {args.out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from peftdecl.train.data import prompt_ids

    if not 1 <= args.max_tokens <= 1_000_000:
        raise PeftdeclError(f"--max-tokens: expected 1..1000000, got {args.max_tokens}")
    backend, model, tokenizer = load_model_and_adapter(args, device=args.device)
    ids = prompt_ids(tokenizer, args.prompt) if args.chat else tokenizer.encode(args.prompt)
    new = backend.generate(model, ids, args.max_tokens, tokenizer.eos_token_id)
    print(tokenizer.decode(new, skip_special_tokens=True))
    return 0
