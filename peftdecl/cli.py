"""The ``peftdecl`` command: validate specs, generate schemas, inspect adapters, run the demo, convert adapter
files between HF PEFT and mlx-lm, and compare backends (``equiv``)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from peftdecl.cli_combine import add_combine_command
from peftdecl.cli_model import add_model_commands
from peftdecl.errors import PeftdeclError, SpecError

MAX_BATCH = 256
MAX_SEQ_LEN = 8192
MAX_LAYERS = 100_000
"""Bounds of ``equiv --batch/--seq-len`` and ``convert --num-layers``."""
MAX_MESSAGE = 2000
"""Characters of an error message printed at most (a message quoting a huge input stays one readable line)."""
REPORT_HINT = "this is a bug in peftdecl; please report it with the command line and the input"
NumberT = TypeVar("NumberT", int, float)


def _validate(args: argparse.Namespace) -> int:
    from peftdecl.recipe import is_recipe, recipe_summary
    from peftdecl.spec import load_spec
    from peftdecl.train.load import is_train_file, load_train_file, read_train_data, resolve_adapter_spec
    from peftdecl.train.mlx_lm_config import is_mlx_lm_config

    failed = False
    for name in args.files:
        path = Path(name)
        try:
            data = _train_data(path, read_train_data)
            if is_recipe(data):
                print(f"{name}: ok ({recipe_summary(path.absolute())})")
                continue
            if data is not None and is_train_file(data):
                # a training file (or an mlx_lm.lora config): the file, then the adapter spec it names
                spec = resolve_adapter_spec(load_train_file(path.absolute()))
                what = "mlx_lm.lora config" if is_mlx_lm_config(data) else "training file"
                print(f"{name}: ok ({what}, {spec.peft_type})")
                continue
            spec = load_spec(path if _is_dir(path) else path.absolute())
        except SpecError as exc:
            failed = True
            for where, message in exc.problems or (("$", str(exc)),):
                print(f"{name}: {where}: {_one_line(message)}")
        except PeftdeclError as exc:
            failed = True
            print(f"{name}: {_one_line(str(exc))}")
        else:
            print(f"{name}: ok ({spec.peft_type})")
    return 1 if failed else 0


def _train_data(path: Path, read: Callable[[Path], tuple[dict[str, object], str | None]]) -> object:
    """The file's parsed data when it can be read as a training file, else None (``load_spec`` then reads it and
    reports whatever is wrong, as it did before training files existed)."""
    if _is_dir(path):
        return None
    try:
        return read(path.absolute())[0]
    except SpecError:
        return None


def _is_dir(path: Path) -> bool:
    """``path.is_dir()``, False where the path cannot even be looked at (load_spec then says why)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _schema(args: argparse.Namespace) -> int:
    from peftdecl import schema

    argv = (["--out", str(args.out)] if args.out else []) + (["--check"] if args.check else [])
    return schema.main(argv)


def _inspect(args: argparse.Namespace) -> int:
    from peftdecl.inspect import format_summary, summarise_all

    # read everything first, so that a bad sub-adapter prints one error line and no half table
    summaries = summarise_all(Path(args.directory))
    print("\n\n".join(format_summary(summary) for summary in summaries))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from peftdecl.demo import run_demo

    return run_demo(spec_path=args.spec, out=args.out)


def _convert(args: argparse.Namespace) -> int:
    from peftdecl.formats.mlx_lm import convert_adapter

    plan = convert_adapter(Path(args.src), Path(args.dst), args.to, num_layers=args.num_layers)
    print(f"{args.src} -> {args.dst} ({args.to}): {plan.kind}, {len(plan.layers)} layers")
    return 0


def _equiv(args: argparse.Namespace) -> int:
    from peftdecl.equiv import load_source, run_equivalence

    report = run_equivalence(
        load_source(args.source),
        model_dir=args.model,
        backend_names=args.backends.split(",") if args.backends else None,
        seed=args.seed,
        perturb=args.perturb,
        batch=args.batch,
        seq_len=args.seq_len,
    )
    print(report.format())
    return 0 if report.passed else 1


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line reported as one ``error:`` line (exit 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _number_in(
    convert: Callable[[str], NumberT], low: NumberT, high: NumberT, noun: str, bounds: str
) -> Callable[[str], NumberT]:
    """An argparse type: ``convert(text)``, finite and in [low, high] (bounds keep a typo from allocating or
    running for hours); ``noun`` and ``bounds`` word the two errors."""

    def parse(text: str) -> NumberT:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text[:40]!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text[:40]}")
        return value

    return parse


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""
    return _number_in(int, low, high, "an integer", f"between {low} and {high}")


def _float_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high]."""
    return _number_in(float, low, high, "a number", f"a finite number between {low:g} and {high:g}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="peftdecl", description="Declarative PEFT adapters, HF PEFT compatible.")
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser(
        "validate", help="check spec, training or recipe files (JSON/YAML/adapter_config.json)"
    )
    validate.add_argument("files", nargs="+", help="spec files or adapter folders")
    validate.set_defaults(run=_validate)

    schema = sub.add_parser("schema", help="write or check the JSON Schemas")
    group = schema.add_mutually_exclusive_group()
    group.add_argument("--out", type=Path, help="folder to write the schemas to")
    group.add_argument("--check", action="store_true", help="exit 1 if schemas/ is stale")
    schema.set_defaults(run=_schema)

    inspect = sub.add_parser("inspect", help="summarise a saved adapter folder")
    inspect.add_argument("directory")
    inspect.set_defaults(run=_inspect)

    demo = sub.add_parser(
        "demo", help="spec -> plan -> NumPy reference -> HF files -> reload -> parity table"
    )
    demo.add_argument("--spec", type=Path, default=None, help="spec file (default: a LoRA on a tiny Llama)")
    demo.add_argument("--out", type=Path, default=None, help="keep the saved adapter here")
    demo.set_defaults(run=_demo)

    convert = sub.add_parser("convert", help="convert a LoRA/DoRA adapter between HF PEFT and mlx-lm files")
    convert.add_argument("src", help="adapter folder (format detected)")
    convert.add_argument("dst", help="folder to write")
    convert.add_argument("--to", required=True, choices=["hf", "mlx-lm"])
    convert.add_argument(
        "--num-layers",
        type=_int_in(1, MAX_LAYERS),
        default=None,
        help="the model's block count (lets mlx-lm keys be block-relative)",
    )
    convert.set_defaults(run=_convert)

    equiv = sub.add_parser(
        "equiv", help="the same adapter on several backends: per-layer and logits error table"
    )
    equiv.add_argument("source", help="spec file, inline JSON, or a saved adapter folder")
    equiv.add_argument(
        "--model", required=True, help="local HF checkpoint folder (config.json + model.safetensors)"
    )
    equiv.add_argument("--backends", default=None, help="comma-separated (default: every installed backend)")
    equiv.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=0)
    equiv.add_argument(
        "--perturb", type=_float_in(0.0, 1e3), default=0.05, help="noise added to a spec's initial tensors"
    )
    equiv.add_argument("--batch", type=_int_in(1, MAX_BATCH), default=2)
    equiv.add_argument("--seq-len", type=_int_in(1, MAX_SEQ_LEN), default=6)
    equiv.set_defaults(run=_equiv)
    add_model_commands(sub)
    add_combine_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``peftdecl`` command."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad command line already reported in one line
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        return int(args.run(args))
    except PeftdeclError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # an escape is a bug: say so in one line, not a traceback
        print(f"error: {type(exc).__name__}: {_one_line(str(exc))} ({REPORT_HINT})", file=sys.stderr)
        return 3


def _one_line(message: str) -> str:
    """A multi-problem message joined into one line (each problem stays readable, separated by "; ")."""
    line = "; ".join(part.strip() for part in message.splitlines() if part.strip()) or "(no message)"
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 1] + "…"


if __name__ == "__main__":
    raise SystemExit(main())
