"""The kind registry (issue 11, item 1): a kind declared once, every table derived from it.

The proof: a NEW kind, "scale_shift" (y = (W x) ⊙ (1 + s) + b + t, one scale s and one shift t per output
channel), is defined entirely in this file: its spec Struct, its layout, its NumPy ops and its declaration.
Registered at runtime, it validates against its generated JSON Schema, compiles, runs on the NumPy backend with
gradients that match finite differences, merges, saves and reloads in HF PEFT's layout and shows in
``peftdecl inspect``; no file under ``peftdecl/`` or ``backends/`` names it. Expected outputs come from the
formula evaluated here with plain NumPy, and gradients from central differences (tests/gradcheck.py).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import jsonschema
import msgspec
import numpy as np
import pytest
from msgspec import Meta

import peftdecl
import peftdecl.kinds as registry
from peftdecl.errors import BackendError, SpecError
from peftdecl.kinds import KindDecl
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec
from peftdecl.plan.kinds import KindLayout
from peftdecl.spec._base import SpecBase, TargetModules
from tests.gradcheck import check_gradients

ROOT = Path(__file__).resolve().parent.parent

# --- the new kind, start to end ---------------------------------------------------------------------------------


class ScaleShiftSpec(SpecBase, tag="SCALE_SHIFT"):
    """Per-output-channel scale and shift: y = (W x) ⊙ (1 + s) + b + t."""

    target_modules: TargetModules = None
    init_weights: Annotated[
        bool, Meta(description="true: s = t = 0 (a no-op); false: s, t ~ N(0, 0.1²).")
    ] = True


def build_scale_shift_layer(
    spec: ScaleShiftSpec, module: str, layer: LayerInfo, info: ModelInfo
) -> LayerPlan:
    init = Init("zeros") if spec.init_weights else Init("normal", std=0.1)
    channels = (layer.out_features,)
    return LayerPlan(
        module=module,
        layer=layer,
        kind="scale_shift",
        params=(
            ParamSpec("ss_scale", channels, "trainable", init),
            ParamSpec("ss_shift", channels, "trainable", init),
        ),
    )


class ScaleShiftOps:
    """NumPy ops: Δ(x) = (W x) ⊙ s + t, so y = base(x) + Δ(x); merged, W' = diag(1 + s) W and b' = b + t."""

    kind = "scale_shift"
    additive = True

    # the tape-recording pair the NumPy engine runs; everything else derives from it
    def delta_record(self, lp: LayerPlan, layer: Any, p: dict, x: Any) -> tuple[Any, dict]:
        wx = x @ layer.weight.T
        return wx * p["ss_scale"] + p["ss_shift"], {"wx": wx}

    def delta_backward(
        self, lp: LayerPlan, layer: Any, p: dict, tape: dict, d_delta: Any
    ) -> tuple[Any, dict]:
        xp, wx = layer.xp, tape["wx"]
        width = d_delta.shape[-1]
        rows_d, rows_wx = xp.reshape(d_delta, (-1, width)), xp.reshape(wx, (-1, width))
        grads = {"ss_scale": xp.sum(rows_d * rows_wx, axis=0), "ss_shift": xp.sum(rows_d, axis=0)}
        return (d_delta * p["ss_scale"]) @ layer.weight, grads

    def delta(self, lp: LayerPlan, layer: Any, p: dict, x: Any) -> Any:
        return self.delta_record(lp, layer, p, x)[0]

    def record(self, lp: LayerPlan, layer: Any, p: dict, x: Any) -> tuple[Any, dict]:
        delta, tape = self.delta_record(lp, layer, p, x)
        return layer.forward(x) + delta, {"x": x, "delta": tape}

    def forward(self, lp: LayerPlan, layer: Any, p: dict, x: Any) -> Any:
        return self.record(lp, layer, p, x)[0]

    def backward(self, lp: LayerPlan, layer: Any, p: dict, tape: dict, dy: Any) -> tuple[Any, dict]:
        dx_delta, grads = self.delta_backward(lp, layer, p, tape["delta"], dy)
        return layer.input_grad(tape["x"], dy) + dx_delta, grads

    def delta_weight(self, lp: LayerPlan, layer: Any, p: dict) -> Any:
        return p["ss_scale"][:, None] * layer.weight

    def merge(self, lp: LayerPlan, layer: Any, p: dict, cache: dict) -> tuple[Any, Any]:
        return layer.weight + self.delta_weight(lp, layer, p), layer.bias + p["ss_shift"]

    def unmerge(self, lp: LayerPlan, layer: Any, p: dict, cache: dict) -> tuple[Any, Any]:
        return layer.weight / (1.0 + p["ss_scale"][:, None]), layer.bias - p["ss_shift"]


def _no_rank(shapes: Any, spec: SpecBase) -> str | None:
    return None


SCALE_SHIFT = KindDecl(
    name="scale_shift",
    peft_type="SCALE_SHIFT",
    spec_class=ScaleShiftSpec,
    layout=KindLayout(kind="scale_shift", build_layer=build_scale_shift_layer),
    tensor_names=("ss_scale", "ss_shift"),
    hf_markers=(".ss_scale", ".ss_shift"),
    layer_types=("linear",),
    composition="add",
    rank=_no_rank,
    ops={"numpy": ScaleShiftOps()},
    examples={"linear": {"peft_type": "SCALE_SHIFT", "target_modules": ["m"], "init_weights": False}},
    summary="y = (W x) ⊙ (1 + s) + b + t: a learnt per-channel scale and shift",
)
SPEC = dict(SCALE_SHIFT.examples["linear"])


@pytest.fixture
def scale_shift():
    registry.register_kind(SCALE_SHIFT)
    try:
        yield SCALE_SHIFT
    finally:
        registry.unregister_kind("scale_shift")


def _base(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {
        "m.weight": rng.normal(size=(6, 5)),
        "m.bias": rng.normal(size=6),
        "other.weight": rng.normal(size=(3, 6)),
    }
    return state, rng.normal(size=(4, 5))


def _expected(state: dict[str, np.ndarray], s: np.ndarray, t: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (x @ state["m.weight"].T) * (1 + s) + state["m.bias"] + t


# --- the proof --------------------------------------------------------------------------------------------------


def test_the_new_kind_validates_against_its_generated_schema(scale_shift) -> None:
    from peftdecl.schema import kind_schema, union_schema
    from peftdecl.spec import SPEC_TYPES

    assert SPEC_TYPES["SCALE_SHIFT"] is ScaleShiftSpec
    schema = kind_schema("SCALE_SHIFT")
    assert schema["properties"]["peft_type"]["const"] == "SCALE_SHIFT"
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(SPEC)
    jsonschema.Draft202012Validator(union_schema()).validate(SPEC)
    assert not jsonschema.Draft202012Validator(schema).is_valid({**SPEC, "init_weights": "yes"})
    spec = peftdecl.load_spec(SPEC)
    assert type(spec) is ScaleShiftSpec and spec.kind == "scale_shift"
    # msgspec's tagged union of every registered Struct decodes it too (rebuilt when the registry changed)
    decoded = msgspec.json.decode(json.dumps(SPEC).encode(), type=peftdecl.spec.spec_union())
    assert decoded == spec
    with pytest.raises(SpecError) as bad_value:
        peftdecl.load_spec({**SPEC, "init_weights": "yes"})
    assert "$.init_weights" in str(bad_value.value)
    with pytest.raises(SpecError) as other_kinds_field:
        peftdecl.load_spec({**SPEC, "r": 4})
    assert "$.r" in str(other_kinds_field.value) and "LORA" in str(other_kinds_field.value)


def test_published_schemas_stay_the_built_in_ones(scale_shift, tmp_path: Path) -> None:
    from peftdecl.schema import default_dir, main, render_all, stale_files

    assert stale_files(default_dir()) == []  # --check is not disturbed by a registered kind
    files = render_all(registered=True)
    assert "scale_shift.schema.json" in files and "scale_shift.schema.json" not in render_all()
    assert "SCALE_SHIFT" in json.loads(files["adapter.schema.json"])["properties"]["peft_type"]["enum"]
    assert main(["--out", str(tmp_path), "--registered"]) == 0
    assert json.loads((tmp_path / "scale_shift.schema.json").read_text()) == json.loads(
        files["scale_shift.schema.json"]
    )


def test_the_new_kind_compiles_runs_and_has_finite_difference_gradients(scale_shift) -> None:
    state, x = _base()
    model = peftdecl.attach(state, SPEC, backend="numpy", seed=3)
    (lp,) = model.plan().layers
    assert (lp.module, lp.kind, [p.name for p in lp.params]) == ("m", "scale_shift", ["ss_scale", "ss_shift"])
    params = model.trainable_parameters()
    s, t = params["m.ss_scale"], params["m.ss_shift"]
    assert np.all(s != 0) and np.all(t != 0)  # init_weights=False: not a no-op, so the check below can fail
    np.testing.assert_allclose(model("m", x), _expected(state, s, t, x), rtol=1e-12)
    assert sorted(check_gradients(model, "m", x)) == ["input", "m.ss_scale", "m.ss_shift"]


def test_the_new_kind_merges_and_unmerges(scale_shift) -> None:
    state, x = _base(1)
    model = peftdecl.attach(state, SPEC, backend="numpy", seed=4)
    before = model("m", x)
    model.merge()
    np.testing.assert_allclose(model("m", x), before, rtol=1e-12)
    model.unmerge()
    np.testing.assert_allclose(model("m", x), before, rtol=1e-12)
    with model.disable_adapters():
        np.testing.assert_allclose(model("m", x), x @ state["m.weight"].T + state["m.bias"], rtol=1e-12)


def test_the_new_kind_saves_and_reloads_in_hf_layout(scale_shift, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    state, x = _base(2)
    model = peftdecl.attach(state, SPEC, backend="numpy", seed=5)
    model.save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SCALE_SHIFT" and config["target_modules"] == ["m"]
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(saved) == ["base_model.model.m.ss_scale", "base_model.model.m.ss_shift"]
    reloaded = peftdecl.load_adapter(state, tmp_path, backend="numpy")
    # the file holds float32 (HF PEFT's default dtype); the reload runs on exactly those values
    np.testing.assert_array_equal(reloaded.state_dict()["m.ss_scale"], saved["base_model.model.m.ss_scale"])
    s, t = (reloaded.state_dict()[f"m.ss_{n}"] for n in ("scale", "shift"))
    np.testing.assert_allclose(reloaded("m", x), _expected(state, s, t, x), rtol=1e-12)
    np.testing.assert_allclose(reloaded("m", x), model("m", x), rtol=1e-6)  # float32 rounding of s and t


def test_the_new_kind_shows_in_inspect(scale_shift, tmp_path: Path, capsys) -> None:
    from peftdecl.cli import main
    from peftdecl.inspect import format_summary, summarise

    state, _ = _base()
    peftdecl.attach(state, SPEC, backend="numpy").save(tmp_path)
    summary = summarise(tmp_path)
    assert summary.spec.peft_type == "SCALE_SHIFT"
    assert summary.modules == {"m": {"ss_scale": (6,), "ss_shift": (6,)}} and summary.shared == {}
    assert "shared" not in format_summary(summary)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kind        SCALE_SHIFT" in out
    row = next(line for line in out.splitlines() if line.startswith("m "))
    assert row.split()[1] == "-" and "ss_scale [6]" in row


def test_the_new_kind_is_in_the_backend_capabilities_only_where_it_has_ops(scale_shift) -> None:
    numpy_caps = peftdecl.backends()["numpy"].capabilities
    assert numpy_caps is not None and numpy_caps.supports("scale_shift", "linear")
    assert not numpy_caps.supports("scale_shift", "conv2d")
    assert "scale_shift" in numpy_caps.mixed_batch and "scale_shift" in numpy_caps.multi_active
    torch_caps = peftdecl.backends()["torch"].capabilities
    assert (
        torch_caps is not None
        and torch_caps.why_not("scale_shift") == "the torch backend does not implement scale_shift"
    )
    with pytest.raises(BackendError, match=r"scale_shift.*torch"):
        registry.ops_for("scale_shift", "torch")


def test_the_new_kind_is_gone_after_unregister(scale_shift) -> None:
    registry.unregister_kind("scale_shift")
    try:
        from peftdecl.spec import SPEC_TYPES

        assert "SCALE_SHIFT" not in SPEC_TYPES
        assert not peftdecl.backends()["numpy"].capabilities.supports("scale_shift")
        with pytest.raises(SpecError, match="unknown adapter kind"):
            peftdecl.load_spec(SPEC)
    finally:
        registry.register_kind(SCALE_SHIFT)  # the fixture unregisters it again


def test_no_file_of_peftdecl_or_the_backends_names_the_new_kind() -> None:
    sources = [*ROOT.joinpath("peftdecl").rglob("*.py"), *ROOT.joinpath("backends").rglob("*.py")]
    assert sources
    assert [str(p) for p in sources if "scale_shift" in p.read_text(encoding="utf-8").lower()] == []


# --- entry points -----------------------------------------------------------------------------------------------


class _EntryPoint:
    def __init__(self, name: str, value: object) -> None:
        self.name, self.value, self._value = name, f"tests:{name}", value

    def load(self) -> object:
        return self._value


def _patch_entry_points(monkeypatch, points: list[_EntryPoint]) -> None:
    real = registry.importlib.metadata.entry_points

    def entry_points(**kwargs: Any) -> Any:
        return points if kwargs.get("group") == registry.ENTRY_POINT_GROUP else real(**kwargs)

    monkeypatch.setattr(registry.importlib.metadata, "entry_points", entry_points)
    registry.refresh()


def test_an_entry_point_in_group_peftdecl_kinds_is_picked_up(monkeypatch) -> None:
    # a callable returning several declarations, as a plugin package would export it
    _patch_entry_points(monkeypatch, [_EntryPoint("plugin", lambda: [SCALE_SHIFT])])
    try:
        assert "scale_shift" in registry.kinds() and list(registry.kinds())[-1] == "scale_shift"
        assert peftdecl.load_spec(SPEC).kind == "scale_shift"
        with pytest.raises(KeyError):
            registry.unregister_kind("scale_shift")  # only runtime registrations can be removed
    finally:
        monkeypatch.undo()
        registry.refresh()
    assert "scale_shift" not in registry.kinds()


def test_a_broken_entry_point_warns_and_keeps_the_others(monkeypatch) -> None:
    from peftdecl.kinds.builtin import BUILTIN_KINDS

    lora_again = dataclasses.replace(
        registry.get_kind("lora")
    )  # a plugin's own declaration of a built-in name
    points = [
        _EntryPoint(
            "builtin", BUILTIN_KINDS
        ),  # peftdecl's own entry point lists the built-ins: skipped silently
        _EntryPoint("broken", "not a KindDecl"),
        _EntryPoint("clash", lora_again),
        _EntryPoint("ok", SCALE_SHIFT),
    ]
    _patch_entry_points(monkeypatch, points)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = registry.kinds()
        assert "scale_shift" in found and found["lora"] is BUILTIN_KINDS[0]
        assert len(found) == len(BUILTIN_KINDS) + 1
        messages = [str(w.message) for w in caught]
        assert len(messages) == 2, messages
        assert any("'broken'" in m for m in messages)
        assert any("'clash'" in m and "built in" in m for m in messages)
    finally:
        monkeypatch.undo()
        registry.refresh()


# --- the built-in declarations and what derives from them -------------------------------------------------------

BUILTINS = list(registry.kinds().values())


def test_builtins_in_hf_order_and_spec_types_follow() -> None:
    from peftdecl.spec import SPEC_TYPES

    assert [d.name for d in BUILTINS] == [
        "lora", "dora", "lora_mha", "adalora", "ia3", "loha", "lokr", "oft", "boft", "vera", "velora", "kasa",
        "bdlora", "monteclora", "mica", "alora", "arrow", "trainable_tokens", "prefix_tuning", "prompt_tuning",
    ]  # fmt: skip
    assert list(SPEC_TYPES) == list(dict.fromkeys(d.peft_type for d in BUILTINS))
    assert [d.name for d in registry.kinds_for_peft_type("LORA")] == [
        "lora", "dora", "lora_mha", "velora", "kasa", "bdlora", "monteclora", "mica", "alora", "arrow",
    ]  # fmt: skip
    assert {d.name for d in BUILTINS if d.additive} == {
        "lora", "adalora", "loha", "lokr", "vera", "velora", "kasa", "bdlora", "monteclora", "mica", "alora",
        "arrow", "trainable_tokens",
    }  # fmt: skip


@pytest.mark.parametrize("decl", BUILTINS, ids=lambda d: d.name)
def test_each_builtin_layout_and_examples(decl: KindDecl) -> None:
    layout = decl.load_layout()
    assert layout.kind == decl.name
    assert not hasattr(layout, "layer_types")  # declared once, in the KindDecl
    assert set(decl.examples) == (set(decl.layer_types) or {"model"})
    for example in decl.examples.values():
        # a kind reached from another (lora_mha from lora) is that kind's spec, handed its layers by the layout
        assert peftdecl.load_spec(example).kind == (decl.reached_from or decl.name)


@pytest.mark.parametrize("decl", [d for d in BUILTINS if d.tensor_names], ids=lambda d: d.name)
def test_inspect_splits_every_declared_tensor_under_its_module(decl: KindDecl) -> None:
    # the drift issue 11 found: an OFT adapter on an embedding was listed as "shared emb.oft_embedding_R.weight"
    from peftdecl.inspect import split_key

    for tensor in decl.tensor_names:
        assert split_key(f"base_model.model.layers.0.emb.{tensor}", "hf") == ("layers.0.emb", tensor)


def test_hf_markers_tell_the_kinds_apart() -> None:
    from peftdecl.formats.hf_peft import kind_markers

    markers = kind_markers()
    assert list(markers) == list(dict.fromkeys(d.peft_type for d in BUILTINS))
    assert ".lora_magnitude_vector" in markers["LORA"] and ".lora_A." in markers["LORA"]  # LoRA and DoRA


def test_backend_tables_come_from_the_declarations() -> None:
    every = registry.backend_kinds(
        "numpy", ("linear", "embedding", "conv1d", "conv2d", "conv3d", "gpt2_conv1d", "mha")
    )
    # "parameter" (LoRA's target_parameters) is not among the layer types asked for here
    assert every == {d.name: tuple(t for t in d.layer_types if t != "parameter") for d in BUILTINS}
    mlx = registry.backend_kinds("mlx", ("linear", "embedding"))
    assert mlx["oft"] == ("linear", "embedding") and mlx["boft"] == ("linear",) and mlx["prompt_tuning"] == ()
    with pytest.raises(BackendError, match="no such kind"):
        registry.ops_for("nope", "numpy")


def test_capabilities_are_read_without_importing_torch_or_mlx() -> None:
    code = (
        "import sys, peftdecl\n"
        "caps = {n: e.capabilities for n, e in peftdecl.backends().items()}\n"
        "assert caps['torch'].supports('lora', 'conv1d') and caps['mlx'].why_not('lora', 'conv2d')\n"
        "print(sorted(m for m in ('torch', 'mlx', 'mlx.core') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_register_refuses_a_clash() -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register_kind(registry.get_kind("lora"))

    class OtherLora(SpecBase, tag="LORA"):
        """A second Struct claiming LORA."""

    clash = KindDecl(
        name="lora_two",
        peft_type="LORA",
        spec_class=OtherLora,
        layout="peftdecl.plan.kinds.lora:LAYOUT",
        tensor_names=(),
        hf_markers=(),
        layer_types=("linear",),
        composition="add",
    )
    with pytest.raises(ValueError, match="belongs to LoraSpec"):
        registry.register_kind(clash)
    with pytest.raises(KeyError, match="known kinds"):
        registry.get_kind("lora_two")
    assert msgspec.json.decode(b'{"peft_type": "LORA"}', type=peftdecl.spec.spec_union()).peft_type == "LORA"
