"""HF PEFT's own custom-model test matrix (``TEST_CASES`` of ``tests/test_custom_models.py`` in PEFT's sdist),
fetched once and run against peftdecl's torch backend.

PEFT ships its tests only in the sdist, so the sdist of the installed peft version is downloaded with pip into a
cache folder (``$PEFTDECL_TEST_CACHE`` or ``~/.cache/peftdecl-tests``) and the test file is extracted next to it.
The file's relative imports (PEFT's test-only helpers, which need ``accelerate`` and ``datasets``) are not
loaded: only its imports of installed packages, its top-level functions and model classes, ``TEST_CASES`` and the
inputs method of its custom-model test class are executed.

A row is run as a new user would: PEFT wraps its tiny model with the row's config, every trainable adapter
tensor gets seeded noise (so no adapter is the identity), PEFT saves the folder, and peftdecl loads that folder
onto a fresh copy of the tiny model. Outputs, then merged outputs, are compared.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The kinds peftdecl claims, by PEFT config class; the prompt-learning configs are listed so that rows of them,
# should a PEFT version add any, are run too.
CLAIMED_CONFIGS = frozenset(
    {
        "LoraConfig",
        "AdaLoraConfig",
        "IA3Config",
        "LoHaConfig",
        "LoKrConfig",
        "OFTConfig",
        "BOFTConfig",
        "VeraConfig",
        "TrainableTokensConfig",
        "PromptTuningConfig",
        "PrefixTuningConfig",
        "PromptEncoderConfig",
    }
)
TEST_FILE = "tests/test_custom_models.py"
INPUTS_CLASS, INPUTS_METHOD = "TestPeftCustomModel", "prepare_inputs_for_testing"
PIP_TIMEOUT_S = 300


class MatrixUnavailableError(Exception):
    """PEFT's test file cannot be had here (offline, pip failed, the file changed shape); the text says why."""


@dataclass(frozen=True)
class Row:
    """One ``TEST_CASES`` entry: PEFT's test name, its tiny model's id, the config class and its keywords."""

    name: str
    model_id: str
    config_class: type
    config_kwargs: dict[str, Any]

    def config(self) -> Any:
        """A fresh config object (a row's keywords may hold config objects: they are shared, never mutated)."""
        return self.config_class(**self.config_kwargs)


@dataclass(frozen=True)
class Matrix:
    """What the extracted test file provides: the rows, a tiny-model factory and the inputs every row uses."""

    version: str
    rows: tuple[Row, ...]
    make_model: Callable[[str], Any]
    make_inputs: Callable[[], dict[str, Any]]


def cache_folder(version: str) -> Path:
    """Where the sdist and the extracted test file of PEFT ``version`` are kept."""
    root = os.environ.get("PEFTDECL_TEST_CACHE") or Path.home() / ".cache" / "peftdecl-tests"
    return Path(root) / f"peft-{version}"


def download_sdist(version: str, folder: Path) -> Path:
    """``peft-{version}.tar.gz`` in ``folder``, fetched by pip (sdist only) unless already there. pip downloads
    into a private folder first and the file is moved in whole, so parallel test workers never see half of it."""
    sdist = folder / f"peft-{version}.tar.gz"
    if sdist.is_file():
        return sdist
    with tempfile.TemporaryDirectory(dir=folder) as private:
        command = [sys.executable, "-m", "pip", "download", f"peft=={version}", "--no-binary", ":all:"]
        command += ["--no-deps", "--quiet", "--retries", "1", "--timeout", "30", "-d", private]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MatrixUnavailableError(f"pip download of peft=={version} failed: {exc}") from exc
        fetched = Path(private) / sdist.name
        if done.returncode != 0 or not fetched.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise MatrixUnavailableError(
                f"pip could not download the peft=={version} sdist (offline?): {last}"
            )
        fetched.replace(sdist)
    return sdist


def fetch_test_file(version: str) -> Path:
    """PEFT ``version``'s ``tests/test_custom_models.py``, downloaded and extracted once into the cache."""
    folder = cache_folder(version)
    extracted = folder / "test_custom_models.py"
    if extracted.is_file():
        return extracted
    folder.mkdir(parents=True, exist_ok=True)
    sdist = download_sdist(version, folder)
    member = f"peft-{version}/{TEST_FILE}"
    with tarfile.open(sdist) as archive:
        try:
            handle = archive.extractfile(member)
        except KeyError as exc:
            raise MatrixUnavailableError(f"{sdist} has no {member}") from exc
        if handle is None:
            raise MatrixUnavailableError(f"{member} in {sdist} is not a file")
        partial = folder / f"test_custom_models.{os.getpid()}.part"
        partial.write_bytes(handle.read())
    partial.replace(extracted)  # whole or absent: a parallel worker never reads half a file
    return extracted


def _wanted(node: ast.stmt) -> bool:
    """The statements loaded from PEFT's test file: absolute imports, functions, model classes, TEST_CASES."""
    if isinstance(node, ast.Import):
        return True
    if isinstance(node, ast.ImportFrom):
        return node.level == 0  # relative imports are PEFT's test helpers (accelerate, datasets)
    if isinstance(node, ast.FunctionDef):
        return True
    if isinstance(node, ast.ClassDef):
        return not node.name.startswith("Test") and not node.decorator_list
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == "TEST_CASES" for t in node.targets)
    return False


def _inputs_function(tree: ast.Module) -> ast.FunctionDef:
    """The custom-model test class's inputs method (``self`` only gives ``torch_device``)."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == INPUTS_CLASS:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == INPUTS_METHOD:
                    return item
    raise MatrixUnavailableError(f"{TEST_FILE} has no {INPUTS_CLASS}.{INPUTS_METHOD}")


def load_matrix(path: Path, version: str) -> Matrix:
    """Execute the parts of PEFT's test file the matrix needs (see :func:`_wanted`) in a fresh module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    kept = [node for node in tree.body if _wanted(node)] + [_inputs_function(tree)]
    module = types.ModuleType("peft_custom_models_matrix")
    module.__file__ = str(path)
    code = compile(ast.Module(body=kept, type_ignores=[]), str(path), "exec")
    try:
        exec(code, module.__dict__)  # PEFT's own test file, from the sdist pip fetched
    except ImportError as exc:  # the file needs a package (or a name in one) this environment lacks
        raise MatrixUnavailableError(f"{TEST_FILE} of peft {version} does not import here: {exc}") from exc
    namespace = module.__dict__
    for needed in ("TEST_CASES", "MockTransformerWrapper", INPUTS_METHOD):
        if needed not in namespace:
            raise MatrixUnavailableError(f"{TEST_FILE} of peft {version} defines no {needed}")
    rows = tuple(Row(*case) for case in namespace["TEST_CASES"])
    device = types.SimpleNamespace(torch_device="cpu")
    return Matrix(
        version=version,
        rows=rows,
        make_model=namespace["MockTransformerWrapper"].from_pretrained,
        make_inputs=lambda: namespace[INPUTS_METHOD](device),
    )


def peft_matrix() -> Matrix:
    """The matrix of the installed peft version (its sdist fetched once)."""
    try:
        version = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError as exc:
        raise MatrixUnavailableError("peft is not installed") from exc
    return load_matrix(fetch_test_file(version), version)


def claimed_rows(matrix: Matrix) -> list[Row]:
    """The rows whose config class is one of the kinds peftdecl claims."""
    return [row for row in matrix.rows if row.config_class.__name__ in CLAIMED_CONFIGS]


def row_ids(rows: list[Row]) -> list[str]:
    """A test id per row: PEFT's name with spaces as underscores; a repeated name gets ``-2``, ``-3``, ..."""
    seen: dict[str, int] = {}
    ids = []
    for row in rows:
        base = re.sub(r"\s+", "_", row.name.strip())
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return ids


def perturb_adapter(wrapped: Any, seed: int = 7, scale: float = 0.05) -> None:
    """Add ``scale`` × standard normal noise (seeded) to every trainable tensor of PEFT's model: its adapter
    tensors and modules_to_save copies, so that no adapter is the identity PEFT initialises most kinds to."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in wrapped.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


@dataclass
class PeftRun:
    """PEFT's side of one row: outputs of the base model, the adapted model and its merge_and_unload; where PEFT
    cannot merge (it refuses grouped convolutions, for one), ``merged`` is None and ``merge_error`` says why."""

    base: Any
    adapted: Any
    merged: Any | None
    merge_error: str | None = None


def run_peft(matrix: Matrix, row: Row, folder: Path) -> PeftRun:
    """PEFT wraps the row's tiny model (seeded), its adapter is perturbed and saved to ``folder``; returns the
    eval-mode outputs on the row's inputs before wrapping, wrapped and merged."""
    import peft
    import torch

    inputs = matrix.make_inputs()
    base = matrix.make_model(row.model_id).eval()
    with torch.no_grad():
        base_out = base(**inputs)
    torch.manual_seed(1234)
    wrapped = peft.get_peft_model(base, row.config())
    perturb_adapter(wrapped)
    wrapped.eval()
    with torch.no_grad():
        adapted_out = wrapped(**inputs)
    wrapped.save_pretrained(folder)
    try:
        merged = wrapped.merge_and_unload().eval()
    except (NotImplementedError, ValueError) as exc:  # PEFT's own "cannot merge this layer"
        return PeftRun(base_out, adapted_out, None, f"{type(exc).__name__}: {exc}")
    with torch.no_grad():
        merged_out = merged(**inputs)
    return PeftRun(base_out, adapted_out, merged_out)


def load_ours(matrix: Matrix, row: Row, folder: Path) -> Any:
    """peftdecl's torch backend loads PEFT's folder onto a fresh copy of the row's tiny model."""
    import peftdecl

    return peftdecl.load_adapter(matrix.make_model(row.model_id), folder, backend="torch")
