"""Cross-backend equivalence: the same adapter, with the same numbers, on every backend, run on the same tokens.

Each adapted layer's output on every backend is compared with the float64 NumPy reference applied to that
backend's own input of the layer (so an upstream difference does not count twice); the final logits are compared
with those of the first backend that produced them. Agreement is ‖out − ref‖ / ‖ref‖: float32 layers ≤ 1e-5,
logits ≤ 1e-4. Backends are reached only through the registry; a backend without the optional ``capture`` /
``load_checkpoint`` methods (:mod:`peftdecl.backend`) is reported as skipped, with the reason.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peftdecl._json import JsonValue
from peftdecl.backend import Capturing, CheckpointLoading, backends, get_backend
from peftdecl.errors import PeftdeclError
from peftdecl.formats.registry import is_adapter_dir
from peftdecl.formats.safetensors_io import read_safetensors
from peftdecl.model import AdaptedModel
from peftdecl.plan import LayerInfo, ModelInfo
from peftdecl.spec import SpecBase, load_spec

LAYER_TOL = 1e-5
LOGITS_TOL = 1e-4
ADAPTER = "default"


@dataclass
class EquivReport:
    """Relative errors by row (adapted module, then ``logits``) and backend; None where not compared."""

    title: str
    backends: list[str]
    rows: dict[str, dict[str, float | None]]
    reference: str | None = None
    """The backend whose logits the others are compared with."""
    skipped: dict[str, str] = field(default_factory=dict)
    layer_tol: float = LAYER_TOL
    logits_tol: float = LOGITS_TOL

    def failures(self) -> list[str]:
        """``"row/backend: error > tol"`` for every comparison above its tolerance."""
        out = []
        for row, errors in self.rows.items():
            tol = self.logits_tol if row == "logits" else self.layer_tol
            out += [
                f"{row}/{b}: {e:.2e} > {tol:.0e}" for b, e in errors.items() if e is not None and not e <= tol
            ]
        return out

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.failures()

    def format(self) -> str:
        width = max([len("module"), *map(len, self.rows)])
        lines = [
            self.title,
            f"relative error: layers vs the NumPy float64 reference on each backend's own layer input (tol "
            f"{self.layer_tol:.0e}); logits vs {self.reference or '-'} (tol {self.logits_tol:.0e})",
            "module".ljust(width) + "".join(f"  {b:>10}" for b in self.backends),
        ]
        for row, errors in self.rows.items():
            cells = []
            for b in self.backends:
                value = errors.get(b)
                cells.append(
                    "ref"
                    if row == "logits" and b == self.reference
                    else "-"
                    if value is None
                    else f"{value:.2e}"
                )
            lines.append(row.ljust(width) + "".join(f"  {c:>10}" for c in cells))
        lines += [f"{b}: skipped ({why})" for b, why in self.skipped.items()]
        lines.append(
            "PASS" if self.passed else "FAIL: " + ("; ".join(self.failures()) or "nothing was compared")
        )
        return "\n".join(lines)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """‖actual − expected‖ / ‖expected‖ (absolute when expected is zero), in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    denom = np.linalg.norm(expected)
    diff = np.linalg.norm(actual - expected)
    return float(diff / denom) if denom > 0 else float(diff)


def perturbed(
    arrays: Mapping[str, np.ndarray], trainable: set[str], scale: float, seed: int
) -> dict[str, np.ndarray]:
    """Trainable tensors plus seeded N(0, scale²) noise, so that zero-initialised factors are exercised too."""
    out = {}
    for key, value in arrays.items():
        value = np.asarray(value, dtype=np.float64)
        if key in trainable and scale > 0:
            rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8")), 1])
            value = value + scale * rng.normal(size=value.shape)
        out[key] = value.astype(np.float32)
    return out


def checkpoint_state(directory: str | Path) -> dict[str, np.ndarray]:
    """The weights of a local HF checkpoint folder (every ``model*.safetensors``) as float64 arrays."""
    files = sorted(Path(directory).glob("model*.safetensors"))
    if not files:
        raise PeftdeclError(
            f"{directory}: no model*.safetensors (expected a save_pretrained checkpoint folder)"
        )
    state: dict[str, np.ndarray] = {}
    for path in files:
        tensors, _ = read_safetensors(path, floats_only=False)  # base checkpoints may hold int buffers
        state.update({k: v.astype(np.float64) for k, v in tensors.items()})
    return state


def _adapted(backend_name: str, model: object, **options: object) -> AdaptedModel:
    return AdaptedModel.create(get_backend(backend_name), model, engine_options=None, **options)


def _numpy_options(info: ModelInfo, state: Mapping[str, np.ndarray]) -> dict[str, object]:
    layer_types: dict[str, LayerInfo] = {m: li for m, li in info.layers.items() if f"{m}.weight" in state}
    facts = (
        "output_head", "classifier_head", "word_embeddings", "model_type", "num_layers", "hidden_size",
        "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    )  # fmt: skip
    return {"layer_types": layer_types, **{f: getattr(info, f) for f in facts}}


def run_equivalence(
    source: object,
    *,
    model_dir: str | Path | None = None,
    models: Mapping[str, object] | None = None,
    numpy_state: Mapping[str, np.ndarray] | None = None,
    backend_names: Sequence[str] | None = None,
    seed: int = 0,
    perturb: float = 0.05,
    input_ids: np.ndarray | None = None,
    batch: int = 2,
    seq_len: int = 6,
    layer_tol: float = LAYER_TOL,
    logits_tol: float = LOGITS_TOL,
) -> EquivReport:
    """Compare backends on one adapter.

    ``source`` is a spec (anything :func:`peftdecl.load_spec` takes: the adapter is initialised from ``seed`` on
    the first backend, its trainable tensors perturbed by ``perturb``, and those numbers given to every backend)
    or a saved adapter folder (HF PEFT or mlx-lm, loaded as is). Models come from ``models`` (backend name ->
    model, adapted in place) or are loaded from ``model_dir`` by each backend's ``load_checkpoint``; the NumPy
    reference reads ``numpy_state`` or the checkpoint's safetensors.
    """
    available = [n for n, e in backends().items() if e.available]
    names = list(backend_names) if backend_names is not None else available
    missing = [n for n in names if n not in available]
    if missing:
        raise PeftdeclError(f"backends {missing} are not available; available: {available}")
    runners = [n for n in names if n != "numpy"]
    skipped: dict[str, str] = {}
    adapted: dict[str, AdaptedModel] = {}
    engines: dict[str, Capturing] = {}
    if model_dir is not None:
        _check_model_dir(Path(model_dir))
    folder = _adapter_folder(source)
    spec: SpecBase | None = None if folder is not None else load_spec(source)
    arrays: dict[str, np.ndarray] | None = None
    for name in runners:
        model = (models or {}).get(name)
        if model is None:
            backend = get_backend(name)
            if model_dir is None or not isinstance(backend, CheckpointLoading):
                skipped[name] = "no model given" if model_dir is None else "backend has no load_checkpoint()"
                continue
            model = backend.load_checkpoint(model_dir)
        am = _adapted(name, model)
        if not isinstance(am.engine, Capturing):
            skipped[name] = "engine has no capture()"
            continue
        engines[name] = am.engine
        if folder is not None:
            am.load_adapter(folder, ADAPTER, activate=True)
        else:
            if arrays is None:
                plan = am.add_adapter(ADAPTER, spec, seed=seed)
                trainable = {k for k, p in plan.param_specs().items() if p.role == "trainable"}
                arrays = perturbed(am.state_dict(ADAPTER), trainable, perturb, seed)
                am.delete_adapter(ADAPTER)
            am.add_adapter(ADAPTER, spec, arrays=arrays, activate=True)
        adapted[name] = am.eval()  # inference: dropout off, so that every backend computes the same function
    if not adapted:
        raise PeftdeclError(
            "no backend could run the model: " + "; ".join(f"{b}: {why}" for b, why in skipped.items())
            if skipped
            else "equiv needs at least one backend besides numpy that runs the model (torch or mlx)"
        )
    first = next(iter(adapted.values()))
    if input_ids is None:
        vocab = first.info.vocab_size
        if not vocab:
            if first.info.word_embeddings is None:
                raise PeftdeclError(
                    "the model facts give neither vocab_size nor word_embeddings: pass input_ids to compare on"
                )
            vocab = first.info.layers[first.info.word_embeddings].in_features
        input_ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq_len))
    captures = {name: engines[name].capture(np.asarray(input_ids)) for name in adapted}
    rows: dict[str, dict[str, float | None]] = {}
    if "numpy" in names:
        state = numpy_state if numpy_state is not None else checkpoint_state(model_dir) if model_dir else None
        if state is None:
            skipped["numpy"] = "no checkpoint folder or state dict for the reference"
        else:
            ref = _adapted("numpy", dict(state), **_numpy_options(first.info, state))
            if folder is not None:
                ref.load_adapter(folder, ADAPTER, activate=True)
            else:
                ref.add_adapter(ADAPTER, spec, arrays=arrays, activate=True)
            ref.eval()
            for name, (_, layers) in captures.items():
                for module, (x, y) in layers.items():
                    x = x if x.dtype.kind in "iu" else x.astype(np.float64)
                    rows.setdefault(module, {})[name] = rel_err(y, ref(module, x))
    with_logits = {n: logits for n, (logits, _) in captures.items() if logits is not None}
    reference = next(iter(with_logits), None)
    if reference is not None and len(with_logits) > 1:
        rows["logits"] = {
            n: rel_err(logits, with_logits[reference]) for n, logits in with_logits.items() if n != reference
        }
    kind = first.plan(ADAPTER).kind
    where = f"model {model_dir}" if model_dir else "the given models"
    origin = f"adapter {folder}" if folder else f"seed {seed}, trainable tensors perturbed by {perturb}"
    title = f"peftdecl equiv: {kind} on {where}, {np.shape(input_ids)[0]}×{np.shape(input_ids)[1]} tokens ({origin})"
    return EquivReport(title, list(adapted), rows, reference, skipped, layer_tol, logits_tol)


def _adapter_folder(source: object) -> Path | None:
    if not isinstance(source, (str, Path)):
        return None
    try:
        return Path(source) if is_adapter_dir(Path(source)) else None
    except OSError:  # a spec given as text is not a path (and may be too long to be one)
        return None


def _check_model_dir(folder: Path) -> None:
    """Refuse a ``model_dir`` that is not a readable folder, with PeftdeclError naming it."""
    try:
        found = folder.is_dir()
    except OSError as exc:  # e.g. a name too long to be a path
        raise PeftdeclError(f"{folder}: not a readable folder ({exc.strerror})") from None
    if not found:
        raise PeftdeclError(f"{folder}: no such folder (expected a save_pretrained checkpoint folder)")


def load_source(text: str) -> Path | JsonValue:
    """A CLI argument: an adapter folder, a spec file, or inline JSON."""
    path = Path(text)
    try:
        if path.exists():
            return path
    except OSError as exc:  # e.g. a name too long to be a path: no spec file can have it
        raise PeftdeclError(f"{text}: not a readable path ({exc.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise PeftdeclError(f"{text}: neither an adapter folder, a spec file nor JSON") from None
