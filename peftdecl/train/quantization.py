"""``model.quantization`` and quantised model folders, checked against the backend that will load them before
any work: the rules of the training file's QLoRA section."""

from __future__ import annotations

from pathlib import Path

import msgspec

from peftdecl.errors import PeftdeclError
from peftdecl.train.config import MLX_QUANTIZATION, TORCH_QUANTIZATION, QuantizationConfig, TrainFile

QUANTIZATION_PATH = "$.model.quantization"


def quantization_problems(quantization: QuantizationConfig, backend: str) -> list[tuple[str, str]]:
    """``model.quantization`` against the backend that will load it: bitsandbytes names on torch, ``bits`` /
    ``group_size`` on mlx, not both 4 and 8 bits, ``bnb_4bit_*`` only with ``load_in_4bit``, and some
    quantisation named at all. A field counts as written when it differs from its (false / null) default."""
    written = [
        f.name for f in msgspec.structs.fields(quantization) if getattr(quantization, f.name) != f.default
    ]
    torch_names = [n for n in written if n in TORCH_QUANTIZATION]
    mlx_names = [n for n in written if n in MLX_QUANTIZATION]
    if not written:
        return [
            (
                QUANTIZATION_PATH,
                "names no quantisation: set load_in_4bit or load_in_8bit (torch) or bits (mlx), or drop the section",
            )
        ]
    found: list[tuple[str, str]] = []
    if backend == "mlx":
        found += [
            (
                f"{QUANTIZATION_PATH}.{name}",
                "is a bitsandbytes setting (torch backend); mlx takes bits and group_size",
            )
            for name in torch_names
        ]
        return found
    found += [
        (
            f"{QUANTIZATION_PATH}.{name}",
            f"is an MLX setting (mlx backend); {backend} takes load_in_4bit or load_in_8bit (bitsandbytes)",
        )
        for name in mlx_names
    ]
    if quantization.load_in_4bit and quantization.load_in_8bit:
        found.append((f"{QUANTIZATION_PATH}.load_in_8bit", "contradicts load_in_4bit: choose 4 or 8 bits"))
    if not quantization.load_in_4bit:
        found += [
            (f"{QUANTIZATION_PATH}.{name}", "applies only with load_in_4bit: true")
            for name in torch_names
            if name.startswith("bnb_4bit_")
        ]
    if not quantization.load_in_4bit and not quantization.load_in_8bit and not found:
        found.append((QUANTIZATION_PATH, "names no quantisation: set load_in_4bit or load_in_8bit"))
    return found


FOLDER_BACKENDS = {"bnb_4bit": "torch", "bnb_8bit": "torch", "mlx_affine": "mlx"}
"""The backend that runs each quantised checkpoint layout (:func:`peftdecl.quant.folder.check_quantized_folder`)."""


def quantized_folder_problems(config: TrainFile) -> list[tuple[str, str]]:
    """A model folder quantised already: it must carry all its quantisation state, suit the backend, and need no
    ``model.quantization`` (it loads as it is)."""
    from peftdecl.quant.folder import check_quantized_folder

    where = "$.model" if isinstance(config.model, str) else "$.model.path"
    try:
        scheme = check_quantized_folder(Path(config.model_path))
    except PeftdeclError as exc:
        return [(where, str(exc))]
    if scheme is None:
        return []
    backend = config.backend or default_backend()
    if FOLDER_BACKENDS.get(scheme, backend) != backend:
        return [
            (
                where,
                f"{config.model_path} holds a {scheme} checkpoint, which the {backend} backend cannot run "
                f"(use backend: {FOLDER_BACKENDS[scheme]})",
            )
        ]
    if config.quantization is not None:
        return [
            (
                QUANTIZATION_PATH,
                f"{config.model_path} is quantised already ({scheme}, in its config.json); "
                "it loads as it is: drop model.quantization",
            )
        ]
    return []


def default_backend() -> str:
    """The platform's default training backend (mlx on Apple silicon, torch elsewhere)."""
    # setup imports load, which imports this module
    from peftdecl.train.setup import default_backend as platform_default

    return platform_default()
