"""Issue 10 items 10-13 for specs: every bad input is a SpecError naming the source and field, quickly; every
bound holds; NaN and infinity are refused; lower-case peft_type and whole floats follow PEFT and the schema."""

from __future__ import annotations

import contextlib
import json
import time

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import PeftdeclError, SpecError, TargetError
from peftdecl.spec import LoraSpec, limits


def spec_error(source) -> SpecError:
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        peftdecl.load_spec(source)
    assert time.perf_counter() - start < 2.0, "a bad spec must fail fast"
    return info.value


def paths(source) -> dict[str, str]:
    return dict(spec_error(source).problems)


def laughs(levels: int, width: int = 10) -> str:
    lines = ["peft_type: LORA", "l0: &l0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        (b"\xff\xfepeft_type: LORA\n", "not UTF-8"),
        ('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}", "4300 digits"),
        ("peft_type: LORA\nr: " + "9" * 5000 + "\n", "4300 digits"),
        ("[" * 1000 + "]" * 1000, "nested deeper"),
        ('{"peft_type": "LORA", "auto_mapping": ' + '{"a": ' * 1000 + "1" + "}" * 1001, "nested deeper"),
        ("peft_type: LORA\nx: " + "[" * 1000 + "]" * 1000 + "\n", "nest"),
        ("peft_type: LORA\n1: 2\n", "keys must be strings"),
        ("peft_type: LORA\nauto_mapping: &a {x: *a}\n", "recursive YAML alias"),
        ("&a [*a]\n", "recursive YAML alias"),
        (laughs(9), "more than 100000 values"),
        ("peft_type: LORA\nr: !!python/object:os.system {}\n", "not allowed"),
        ("peft_type: LORA\nrevision: !!binary aGVsbG8=\n", "not allowed"),
        ("peft_type: LORA\ntarget_modules: !!set {a, b}\n", "not allowed"),
        ("peft_type: LORA\nrevision: !!timestamp 2024-01-01\n", "not allowed"),
        ("peft_type: LORA\nrevision: !custom x\n", "not allowed"),
        ("peft_type: LORA\nrevision: a\x00b\n", "not valid YAML"),
        ('{"peft_type": "LORA", "lora_alpha": NaN}', "not a JSON value"),
        ('{"peft_type": "LORA", "lora_alpha": -Infinity}', "not a JSON value"),
        ("peft_type: LORA\nlora_alpha: .nan\n", "finite"),
        ("peft_type: LORA\nlora_alpha: .inf\n", "finite"),
        ("peft_type: LORA\nalpha_pattern: {q: .nan}\n", "finite"),
        ({"peft_type": "LORA", "lora_alpha": float("nan")}, "finite"),
        ({"peft_type": "LORA", "alpha_pattern": {"q": float("inf")}}, "finite"),
        ({"peft_type": "LOHA", "alpha": float("-inf")}, "finite"),
        ({"peft_type": "LORA", "lora_dropout": float("nan")}, "finite"),
        ({"peft_type": "VERA", "d_initial": float("inf")}, "finite"),
        ({"peft_type": "LORA", 3: 4}, "keys must be strings"),
        ({"peft_type": "LORA", "revision": b"x"}, "expected a JSON value"),
        ({"peft_type": "LORA", "r": 2**64}, "out of range"),
        ({"peft_type": "LORA", "r": 2**20}, "<= 65536"),
        ({"peft_type": "LORA", "revision": "x" * 70_000}, "at most 65536"),
    ],
)
def test_bad_inputs_are_spec_errors(source, fragment) -> None:
    error = spec_error(source)
    assert fragment in str(error), str(error)


def test_billion_laughs_is_refused_before_expansion() -> None:
    # 10 levels of 10 is 10^10 values; counting the shared node graph takes microseconds
    start = time.perf_counter()
    assert "more than" in str(spec_error(laughs(10)))
    assert time.perf_counter() - start < 0.5


def test_a_billion_laughs_inside_auto_mapping_is_refused() -> None:
    text = laughs(8).replace("peft_type: LORA\n", "")
    nested = "peft_type: LORA\nauto_mapping:\n" + "".join("  " + line + "\n" for line in text.splitlines())
    assert "more than" in str(spec_error(nested))


def test_small_aliases_still_work() -> None:
    spec = peftdecl.load_spec(
        "peft_type: LORA\nlayers: &t [q_proj, v_proj]\n".replace("layers", "target_modules")
    )
    assert spec.target_modules == ("q_proj", "v_proj")


def test_unquoted_dates_stay_strings() -> None:
    assert peftdecl.load_spec("peft_type: LORA\nrevision: 2024-01-01\n").revision == "2024-01-01"


@pytest.mark.parametrize("name", ["a" * 300, "a" * 300 + ".json", "x\x00y.yaml", "a/" * 3000 + "b.json"])
def test_bad_paths_are_spec_errors(name) -> None:
    error = spec_error(name)
    assert isinstance(error, SpecError)


def test_files_are_bounded_and_regular(tmp_path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (limits.MAX_DOCUMENT_BYTES + 1))
    assert "at most" in str(spec_error(big))
    assert "not a regular file" in str(spec_error(tmp_path / "fifo.json" if _fifo(tmp_path) else "/dev/null"))
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"peft_type: LORA\nrevision: \xc3\x28\n")
    error = spec_error(bad)
    assert error.source == str(bad) and "not UTF-8" in str(error)


def _fifo(tmp_path) -> bool:
    import os

    try:
        os.mkfifo(tmp_path / "fifo.json")
    except (AttributeError, OSError):
        return False
    return True


def test_lower_case_peft_type_is_refused_with_the_upper_case_name() -> None:
    found = paths({"peft_type": "lora"})
    assert "did you mean 'LORA'" in found["$.peft_type"]


def test_lower_case_peft_type_is_refused_by_peft_too() -> None:
    peft = pytest.importorskip("peft")
    with pytest.raises(KeyError):
        peft.PeftConfig.from_peft_type(peft_type="lora")


def test_whole_floats_in_integer_fields_are_integers() -> None:
    spec = peftdecl.load_spec({"peft_type": "LORA", "r": 8.0, "layers_to_transform": [0.0, 2.0],
                               "target_modules": ["q"], "rank_pattern": {"q": 4.0}})  # fmt: skip
    assert spec.r == 8 and type(spec.r) is int
    assert spec.layers_to_transform == (0, 2) and all(type(i) is int for i in spec.layers_to_transform)
    assert spec.rank_pattern == {"q": 4} and type(spec.rank_pattern["q"]) is int
    assert "$.r" in paths({"peft_type": "LORA", "r": 8.5})
    # int | float fields keep the float
    assert type(peftdecl.load_spec({"peft_type": "LORA", "lora_alpha": 16.0}).lora_alpha) is float


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"peft_type": "LORA", "r": 65_537}, "$.r"),
        ({"peft_type": "LORA", "rank_pattern": {"q": 2**40}}, "$.rank_pattern.q"),
        ({"peft_type": "LORA", "lora_alpha": 2**25}, "$.lora_alpha"),
        (
            {"peft_type": "LORA", "layers_to_transform": [2**21], "target_modules": ["q"]},
            "$.layers_to_transform",
        ),
        ({"peft_type": "BOFT", "boft_n_butterfly_factor": 2**63}, "$.boft_n_butterfly_factor"),
        ({"peft_type": "BOFT", "boft_n_butterfly_factor": 33}, "$.boft_n_butterfly_factor"),
        ({"peft_type": "OFT", "num_cayley_neumann_terms": 65}, "$.num_cayley_neumann_terms"),
        ({"peft_type": "ADALORA", "total_step": 2**41}, "$.total_step"),
        ({"peft_type": "VERA", "projection_prng_key": 2**63}, "$.projection_prng_key"),
        ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2**21}, "$.num_virtual_tokens"),
        ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "token_dim": -1}, "$.token_dim"),
        ({"peft_type": "LOKR", "decompose_factor": -2}, "$.decompose_factor"),
    ],
)
def test_integer_fields_are_bounded(data, path) -> None:
    assert path in paths(data)


def test_specs_built_in_code_are_checked_too() -> None:
    with pytest.raises(SpecError, match="lora_alpha"):
        peftdecl.load_spec(LoraSpec(lora_alpha=float("nan")))
    with pytest.raises(SpecError, match=r"\$\.r"):
        peftdecl.load_spec(LoraSpec(r=2**64))


def test_invalid_regexes_are_refused_at_load() -> None:
    assert "regular expression" in paths({"peft_type": "LORA", "target_modules": "(a"})["$.target_modules"]
    assert "$.exclude_modules" in paths({"peft_type": "LORA", "exclude_modules": "[z-a]"})
    assert "$.rank_pattern.(" in paths({"peft_type": "LORA", "rank_pattern": {"(": 2}})
    assert "$.alpha_pattern.)" in paths({"peft_type": "LORA", "alpha_pattern": {")": 2}})
    assert "$.modules_to_save[0]" in paths({"peft_type": "IA3", "modules_to_save": ["("]})
    found = paths(
        {"peft_type": "LORA", "target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": "("}
    )
    assert "$.layers_pattern" in found


def tiny_state(names=("a" * 40, "q")) -> dict[str, np.ndarray]:
    return {f"{name}.weight": np.ones((4, 4)) for name in names}


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_catastrophic_regex_is_a_target_error_not_a_hang(field) -> None:
    # "(a|aa)+c" backtracks exponentially on a run of a's even in the regex package
    spec = {"peft_type": "LORA", "target_modules": ["q"], field: "(a|aa)+c"}
    start = time.perf_counter()
    with pytest.raises(TargetError, match=rf"{field}.*took over"):
        peftdecl.attach(tiny_state(), spec, backend="numpy")
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_the_issue_pattern_no_longer_hangs(field) -> None:
    # "(a+)+$" made re backtrack for minutes on a long name ending in something else; regex answers at once
    state = tiny_state(("a" * 40 + ".b", "q"))
    spec = {"peft_type": "LORA", "target_modules": ["q"], field: "(a+)+$"}
    start = time.perf_counter()
    with contextlib.suppress(TargetError):  # as target_modules it matches nothing here: a clean error
        peftdecl.attach(state, spec, backend="numpy")
    assert time.perf_counter() - start < 5.0


def test_catastrophic_rank_pattern_key_is_a_target_error() -> None:
    spec = {"peft_type": "LORA", "target_modules": ["a" * 40], "rank_pattern": {"(a|aa)+c": 2}}
    with pytest.raises(TargetError, match="rank_pattern"):
        peftdecl.attach(tiny_state(), spec, backend="numpy")


def test_regex_matching_still_follows_peft() -> None:
    model = peftdecl.attach(tiny_state(("x.q", "x.k", "y.q")), {"peft_type": "LORA", "target_modules": r"x\..*"},
                            backend="numpy")  # fmt: skip
    assert model.plan().targets == ("x.q", "x.k")


def test_adapter_size_is_refused_before_allocation(monkeypatch) -> None:
    from peftdecl.plan import compile_plan
    from peftdecl.plan.ir import LayerInfo, ModelInfo

    # a 2^30 x 2^20 layer at rank 65,536: ~7e13 parameters; refused by the default limit from the plan alone
    info = ModelInfo(layers={"big": LayerInfo("linear", in_features=2**30, out_features=2**20)})
    spec = peftdecl.load_spec({"peft_type": "LORA", "r": 65_536, "target_modules": ["big"]})
    with pytest.raises(PeftdeclError, match=r"adapter 'huge'.*GiB as float64.*PEFTDECL_MAX_ADAPTER_BYTES"):
        compile_plan(spec, info, "huge")
    # through attach, with the limit lowered by the environment variable
    monkeypatch.setenv(limits.ADAPTER_BYTES_ENV, "64")
    ia3 = {"peft_type": "IA3", "target_modules": ["m"], "feedforward_modules": []}
    model = peftdecl.attach({"m.weight": np.ones((4, 4))}, ia3, backend="numpy")
    with pytest.raises(PeftdeclError, match=r"adapter 'second'.*over the limit of 64 bytes"):
        model.add_adapter("second", {"peft_type": "LORA", "r": 2, "target_modules": ["m"]})
    assert "second" not in model.adapters if hasattr(model, "adapters") else True
    monkeypatch.setenv(limits.ADAPTER_BYTES_ENV, "lots")
    with pytest.raises(PeftdeclError, match="PEFTDECL_MAX_ADAPTER_BYTES"):
        limits.max_adapter_bytes()


def test_json_nan_decision_matches_the_schema() -> None:
    """JSON has no NaN: load_spec refuses it, and so does the published schema (see peftdecl/schema.py)."""
    import jsonschema

    from peftdecl.schema import kind_schema

    validator = jsonschema.Draft202012Validator(kind_schema("LORA"))
    for value in (float("nan"), float("inf"), -float("inf")):
        assert not validator.is_valid({"peft_type": "LORA", "lora_alpha": value})
        assert not validator.is_valid({"peft_type": "LORA", "alpha_pattern": {"q": value}})
    assert validator.is_valid({"peft_type": "LORA", "lora_alpha": 16.5})
    assert json.loads(json.dumps(kind_schema("LORA")))  # the schema itself is plain JSON (no NaN inside)


@pytest.mark.parametrize("source", ["&a [*a]\n", "peft_type: LORA\nrevision: !!binary aGk=\n", laughs(9)])
def test_pure_python_yaml_fallback_has_the_same_bounds(source, monkeypatch) -> None:
    from peftdecl.spec import _yaml

    monkeypatch.setattr(_yaml, "_LOADER", _yaml._BoundedLoader)  # as without libyaml
    spec_error(source)
    assert peftdecl.load_spec("peft_type: LORA\nrevision: 2024-01-01\n").revision == "2024-01-01"


def test_large_yaml_is_refused_quickly() -> None:
    text = "peft_type: LORA\ntarget_modules: [" + ", ".join(f"q{i}" for i in range(60_000)) + "]\n"
    assert "at most" in str(spec_error(text))
