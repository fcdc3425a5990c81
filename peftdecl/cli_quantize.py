"""``peftdecl quantize``: write a quantised copy of a float HF checkpoint folder, in the layout transformers saves
after ``BitsAndBytesConfig`` (nf4, fp4, int8) or the one ``mlx_lm.convert -q`` writes (affine)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, cast

from peftdecl.errors import PeftdeclError

if TYPE_CHECKING:
    from peftdecl.quant.scheme import QuantKind

BNB_TYPES = ("nf4", "fp4", "int8")
TYPES = (*BNB_TYPES, "affine")
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_GROUP_SIZE = 64


def add_quantize_command(sub: argparse._SubParsersAction) -> None:
    """Register ``quantize`` on the ``peftdecl`` parser."""
    quantize = sub.add_parser(
        "quantize",
        help="quantise a float checkpoint folder (bitsandbytes nf4/fp4/int8 as transformers saves it, or MLX affine "
        "as mlx_lm.convert writes it)",
    )
    quantize.add_argument("--model", required=True, type=Path, help="float HF checkpoint folder")
    quantize.add_argument("--out", required=True, type=Path, help="new folder for the quantised checkpoint")
    quantize.add_argument(
        "--bits", required=True, type=int, choices=BITS, help="bits per weight (4 or 8 for bnb)"
    )
    quantize.add_argument(
        "--type",
        dest="kind",
        choices=TYPES,
        default=None,
        help="nf4 (default for 4 bits), fp4, int8 (default for 8 bits): bitsandbytes; affine: mlx-lm",
    )
    quantize.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        default=None,
        help=f"weights per scale and bias, --type affine only (default {DEFAULT_GROUP_SIZE})",
    )
    quantize.add_argument(
        "--double-quant", action="store_true", help="quantise the 4-bit block absmax values too (nf4/fp4)"
    )
    quantize.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default=None,
        help="bnb_4bit_compute_dtype recorded in config.json (nf4/fp4; default float32)",
    )
    quantize.set_defaults(run=_quantize)


def resolve_kind(
    bits: int, kind: str | None, group_size: int | None, double_quant: bool, compute_dtype: str | None
) -> QuantKind:
    """The quantisation type for the flags, or PeftdeclError naming the flags that do not go together."""
    if kind is None:
        if bits not in (4, 8):
            raise PeftdeclError(
                f"--bits {bits}: bitsandbytes has 4 and 8 bits; for {bits} bits add --type affine"
            )
        kind = "nf4" if bits == 4 else "int8"
    if kind in BNB_TYPES:
        want = 8 if kind == "int8" else 4
        if bits != want:
            other = "int8" if bits == 8 else "nf4 or fp4" if bits == 4 else "affine"
            raise PeftdeclError(
                f"--bits {bits} --type {kind}: {kind} is {want}-bit; for {bits} bits use --type {other}"
            )
        if group_size is not None:
            raise PeftdeclError(
                f"--group-size: bitsandbytes {kind} has fixed blocks of 64; --group-size is for --type affine"
            )
        if kind == "int8" and (double_quant or compute_dtype is not None):
            flag = "--double-quant" if double_quant else "--compute-dtype"
            raise PeftdeclError(f"{flag}: applies to 4-bit bitsandbytes (nf4/fp4), not int8")
    elif double_quant or compute_dtype is not None:
        flag = "--double-quant" if double_quant else "--compute-dtype"
        raise PeftdeclError(f"{flag}: a bitsandbytes setting (nf4/fp4); --type affine has no such option")
    return cast("QuantKind", kind)


def _quantize(args: argparse.Namespace) -> int:
    from peftdecl.merged_checkpoint import check_new_folder
    from peftdecl.quant.folder_write import quantize_folder

    kind = resolve_kind(args.bits, args.kind, args.group_size, args.double_quant, args.compute_dtype)
    if not args.model.is_dir():
        raise PeftdeclError(f"--model {args.model}: not a folder")
    if args.out.resolve() == args.model.resolve():
        raise PeftdeclError(
            f"--out {args.out}: is the --model folder; write the quantised copy to a new folder"
        )
    try:
        check_new_folder(args.out)
    except PeftdeclError:
        raise PeftdeclError(
            f"--out {args.out}: exists and is not an empty folder; choose a new folder"
        ) from None
    result = quantize_folder(
        args.model,
        args.out,
        bits=args.bits,
        kind=kind,
        group_size=args.group_size or DEFAULT_GROUP_SIZE,
        double_quant=args.double_quant,
        compute_dtype=args.compute_dtype,
    )
    detail = f"{kind}, group size {args.group_size or DEFAULT_GROUP_SIZE}" if kind == "affine" else kind
    if args.double_quant:
        detail += ", double quantisation"
    print(
        f"quantised {args.model} -> {args.out} ({result.quantization}: {args.bits}-bit {detail}): "
        f"{len(result.quantized)} weights quantised, {_size(result.weight_bytes)} of tensors"
    )
    return 0


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (``12.3 MiB``)."""
    value, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
