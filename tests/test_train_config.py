"""The training file: reading (YAML, JSON, mappings), the adapter (inline, spec file, adapter folder), every field's
error with its JSON path, the cross-field rules, ``--set`` overrides, path checks, ``peftdecl validate`` and the
published schema (fresh, and agreeing with the loader)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from peftdecl.cli import main
from peftdecl.errors import TrainConfigError
from peftdecl.train.config import SCHEMA_FILE, TrainFile, train_schema
from peftdecl.train.load import (
    check_paths,
    is_train_file,
    load_train_file,
    resolve_adapter_spec,
    train_file_from_dict,
)
from peftdecl.train.overrides import apply_overrides, parse_override
from tests.fuzz_settings import fuzz_settings

ROOT = Path(__file__).resolve().parent.parent
GOOD: dict[str, object] = {
    "model": "model",
    "backend": "torch",
    "device": "cpu",
    "adapter": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "data": {"train": "train.jsonl", "valid": "valid.jsonl", "mask_prompt": True, "max_seq_length": 64},
    "training": {
        "learning_rate": 2.0e-4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 2,
        "max_steps": 10,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "optim": "adamw",
        "seed": 0,
        "logging_steps": 1,
        "eval_steps": 5,
        "save_steps": 5,
        "save_total_limit": 2,
    },
    "output_dir": "runs/example",
    "save_formats": ["hf", "mlx-lm"],
}


def good() -> dict[str, object]:
    return copy.deepcopy(GOOD)


def problems_of(data: object, overrides: tuple[str, ...] = ()) -> dict[str, str]:
    with pytest.raises(TrainConfigError) as caught:
        load_train_file(data, overrides)  # type: ignore[arg-type]
    return dict(caught.value.problems)


# reading


def test_yaml_json_and_a_mapping_give_the_same_file(tmp_path) -> None:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "run.json").write_text(json.dumps(GOOD))
    from_yaml = load_train_file(tmp_path / "run.yaml")
    assert from_yaml == load_train_file(str(tmp_path / "run.json")) == load_train_file(GOOD)
    assert from_yaml.training.max_steps == 10 and from_yaml.training.lr_scheduler_type == "cosine"
    assert from_yaml.data.mask_prompt is True and from_yaml.save_formats == ["hf", "mlx-lm"]
    assert resolve_adapter_spec(from_yaml).peft_type == "LORA"


def test_defaults_are_transformers_and_mlx_lm_ones() -> None:
    minimal = {"model": "m", "adapter": "a.yaml", "data": {"train": "t.jsonl"}, "output_dir": "o"}
    config = load_train_file(minimal)
    # transformers TrainingArguments' defaults, which the field names promise
    transformers = pytest.importorskip("transformers")
    arguments = transformers.TrainingArguments(output_dir="o", report_to=[])
    for name in ("learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
                 "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "seed",
                 "gradient_checkpointing"):  # fmt: skip
        expected = getattr(arguments, name)
        expected = getattr(expected, "value", expected)  # an enum (lr_scheduler_type)
        assert getattr(config.training, name) == expected, name
    assert getattr(arguments, "warmup_ratio", None) in (None, 0.0) and config.training.warmup_ratio == 0.0
    assert arguments.optim.value.startswith("adamw") and config.training.optim == "adamw"
    assert config.save_formats == ["hf"] and config.generation_check is None


def test_yaml_numbers_written_like_1e_4_are_numbers(tmp_path) -> None:
    # PyYAML (YAML 1.1) reads 1e-4 as a string; YAML 1.2 and mlx-lm's loader read a float
    text = yaml.safe_dump(good()).replace("learning_rate: 0.0002", "learning_rate: 1e-4")
    assert "learning_rate: 1e-4" in text
    (tmp_path / "run.yaml").write_text(text)
    assert load_train_file(tmp_path / "run.yaml").training.learning_rate == 1e-4
    data = good()
    data["training"]["max_steps"] = 10.0  # type: ignore[index]
    assert load_train_file(data).training.max_steps == 10  # a whole float is the integer
    data["model"] = "1e5"  # a string field keeps the text
    assert load_train_file(data).model == "1e5"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("- a\n- b\n", "expected a mapping of training-file fields, got a list"),
        ("", "expected a mapping of training-file fields, got nothing"),
        ("model: [unclosed\n", "not valid YAML"),
        ("a: !!python/object:os.system x\n", "not allowed"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, content: str, fragment: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(content)
    with pytest.raises(TrainConfigError) as caught:
        load_train_file(path)
    assert caught.value.source == str(path) and fragment in str(caught.value)


def test_a_missing_file_or_a_folder_is_named(tmp_path) -> None:
    with pytest.raises(TrainConfigError, match="file not found"):
        load_train_file(tmp_path / "none.yaml")
    with pytest.raises(TrainConfigError, match="is a folder"):
        load_train_file(tmp_path)


# the adapter


def test_adapter_from_a_spec_file_and_from_an_adapter_folder(tmp_path, monkeypatch) -> None:
    from tests.conftest import make_model

    monkeypatch.chdir(tmp_path)  # relative paths are relative to the working directory
    Path("spec.yaml").write_text("peft_type: IA3\ntarget_modules: [k_proj]\nfeedforward_modules: []\n")
    make_model().save(tmp_path / "saved")
    for adapter, kind in (("spec.yaml", "IA3"), ("saved", "LORA")):
        data = good()
        data["adapter"] = adapter
        assert resolve_adapter_spec(load_train_file(data)).peft_type == kind
    data = good()
    data["adapter"] = "notes.txt"
    assert "expected a spec file (.json, .yaml, .yml) or an adapter folder" in problems_of(data)["$.adapter"]
    Path("bad.yaml").write_text("peft_type: LORA\nr: 0\n")
    data["adapter"] = "bad.yaml"
    with pytest.raises(TrainConfigError) as caught:
        resolve_adapter_spec(load_train_file(data))
    assert caught.value.problems == (("$.adapter", "bad.yaml: $.r: must be >= 1, got 0"),)


def test_inline_adapter_problems_are_under_adapter() -> None:
    data = good()
    data["adapter"] = {"peft_type": "LORA", "r": 0, "lora_alfa": 8}
    data["training"]["lerning_rate"] = 1  # type: ignore[index]
    found = problems_of(data)
    assert found["$.adapter.r"] == "must be >= 1, got 0"
    assert "did you mean 'lora_alpha'" in found["$.adapter.lora_alfa"]
    assert "did you mean 'learning_rate'" in found["$.training.lerning_rate"]  # both reported at once
    data["adapter"] = {"r": 4}
    assert "is required" in problems_of(data)["$.adapter.peft_type"]


# every field's error carries its JSON path


def leaf_fields(schema: dict[str, object], path: str = "$") -> list[tuple[str, dict[str, object]]]:
    """(JSON path, subschema) of every field of the file, sections descended into."""
    found = []
    for name, prop in schema["properties"].items():  # type: ignore[union-attr]
        where = f"{path}.{name}"
        objects = [b for b in prop.get("anyOf", [prop]) if b.get("type") == "object" and "properties" in b]
        if objects:
            found += leaf_fields(objects[0], where)
        if name != "adapter":  # a string or any mapping: checked by load_spec, tested above
            found.append((where, prop))
    return found


FIELDS = leaf_fields(train_schema(published=False))


def test_the_field_list_covers_the_sections() -> None:
    names = {path for path, _ in FIELDS}
    assert {"$.model", "$.data.train", "$.training.learning_rate", "$.generation_check.limit"} <= names
    assert len(names) >= 40


def with_field(path: str, value: object) -> dict[str, object]:
    data = good()
    data["generation_check"] = {"limit": 4}
    *parents, last = path.split(".")[1:]
    node = data
    for part in parents:
        child = node.get(part)
        if isinstance(child, str):  # model: PATH, written as its section to reach inside it
            child = {"path": child}
        node[part] = child = {} if child is None else child
        node = child  # type: ignore[assignment]
    node[last] = value
    return data


@pytest.mark.parametrize(("path", "prop"), FIELDS, ids=[path for path, _ in FIELDS])
def test_a_value_of_the_wrong_type_is_reported_at_its_path(path: str, prop: dict[str, object]) -> None:
    kinds = json.dumps(prop)
    wrong = 12345 if '"string"' in kinds else "wrong"
    found = problems_of(with_field(path, wrong))
    assert path in found, found
    assert found[path].startswith("expected"), found[path]


NUMERIC = [(path, prop) for path, prop in FIELDS if prop.get("type") in ("integer", "number")]


@fuzz_settings(ci_examples=30)
@given(st.data())
def test_numbers_out_of_bounds_are_reported_at_their_path(data: st.DataObject) -> None:
    path, prop = data.draw(st.sampled_from(NUMERIC))
    low = prop.get("minimum", prop.get("exclusiveMinimum"))
    high = prop.get("maximum", prop.get("exclusiveMaximum"))
    below = (
        float(low) - data.draw(st.sampled_from([1e-3, 1.0, 1e9])) if "exclusiveMinimum" not in prop else low
    )
    above = float(high) + data.draw(st.sampled_from([1.0, 1e9])) if "exclusiveMaximum" not in prop else high
    value = data.draw(st.sampled_from([below, above]))
    if prop["type"] == "integer" and float(value).is_integer():
        value = int(value)
    found = problems_of(with_field(path, value))
    assert path in found, (path, value, found)
    whole = prop["type"] == "number" or isinstance(value, int)
    assert found[path].startswith("must be" if whole else "expected an integer"), (path, value, found)


def test_unknown_fields_are_named_with_a_suggestion() -> None:
    data = good()
    data["outputdir"] = "x"
    data["data"]["trian"] = "t.jsonl"  # type: ignore[index]
    found = problems_of(data)
    assert found["$.outputdir"] == "unknown field (did you mean 'output_dir'?)"
    assert found["$.data.trian"] == "unknown field (did you mean 'train'?)"
    data = good()
    del data["output_dir"], data["data"]["train"]  # type: ignore[attr-defined]
    assert problems_of(data) == {"$.output_dir": "is required", "$.data.train": "is required"}


def test_enums_and_lists_name_the_values_accepted() -> None:
    assert (
        "one of"
        in problems_of(with_field("$.training.lr_scheduler_type", "cosin"))["$.training.lr_scheduler_type"]
    )
    assert "$.save_formats[1]" in problems_of(with_field("$.save_formats", ["hf", "gguf"]))
    assert "non-unique" in problems_of(with_field("$.save_formats", ["hf", "hf"]))["$.save_formats"]
    assert "$.training.lr_scheduler_kwargs.power" in problems_of(
        with_field("$.training.lr_scheduler_kwargs", {"power": "x"})
    )


# cross-field rules


@pytest.mark.parametrize(
    ("sets", "path", "fragment"),
    [
        (["training.warmup_steps=11"], "$.training.warmup_steps", "more than max_steps 10"),
        (["data.valid=null"], "$.training.eval_steps", "needs data.valid"),
        (["data.valid=null", "training.eval_steps=null", "generation_check.limit=3"], "$.generation_check",
         "needs generation_check.data or data.valid"),
        (["training.lr_scheduler_kwargs.power=2"], "$.training.lr_scheduler_kwargs.power", "cosine takes num_cycles"),
        (["training.lr_scheduler_type=linear", "training.lr_scheduler_kwargs.num_cycles=1"],
         "$.training.lr_scheduler_kwargs.num_cycles", "linear takes no extra arguments"),
        (["training.lr_scheduler_type=polynomial", "training.lr_scheduler_kwargs.lr_end=0.1"],
         "$.training.lr_scheduler_kwargs.lr_end", "< learning_rate"),
        (["training.lr_scheduler_kwargs.num_cycles=0"], "$.training.lr_scheduler_kwargs.num_cycles", "> 0"),
    ],
)  # fmt: skip
def test_cross_field_rules(sets: list[str], path: str, fragment: str) -> None:
    found = problems_of(GOOD, tuple(sets))
    assert fragment in found[path], found


def test_what_transformers_allows_is_allowed() -> None:
    # save_total_limit without save_steps; warm-up with epochs; both warmups (warmup_steps wins, as in transformers)
    sets = ("training.save_steps=null", "training.max_steps=null", "training.num_train_epochs=0.5",
            "training.warmup_ratio=0.1", "training.lr_scheduler_type=polynomial",
            "training.lr_scheduler_kwargs={power: 2.0, lr_end: 1.0e-7}", "generation_check.data=gen.jsonl")  # fmt: skip
    config = load_train_file(GOOD, sets)
    assert config.training.save_total_limit == 2 and config.training.save_steps is None
    assert config.training.lr_scheduler_kwargs == {"power": 2.0, "lr_end": 1.0e-7}
    assert config.generation_check is not None and config.generation_check.data == "gen.jsonl"


# --set


def test_overrides_set_nested_values_parsed_as_yaml() -> None:
    config = load_train_file(
        GOOD,
        ("training.max_steps=5", "training.learning_rate=1e-3", "save_formats=[hf]", "data.valid=null",
         "training.eval_steps=null", "training.gradient_checkpointing=true", "output_dir = runs/b",
         "training.max_steps=6"),
    )  # fmt: skip
    assert config.training.max_steps == 6  # the later override wins
    assert config.training.learning_rate == 1e-3 and config.save_formats == ["hf"]
    assert config.data.valid is None and config.training.gradient_checkpointing is True
    assert config.output_dir == "runs/b"


def test_overrides_create_mappings_and_leave_the_input_alone() -> None:
    data = {"model": "m"}
    out = apply_overrides(
        data, ["training.max_steps=3", "generation_check.limit=2", "adapter.peft_type=LORA"]
    )
    assert out == {"model": "m", "training": {"max_steps": 3}, "generation_check": {"limit": 2},
                   "adapter": {"peft_type": "LORA"}}  # fmt: skip
    assert data == {"model": "m"}
    assert parse_override("a.b==c") == (["a", "b"], "=c")  # the first '=' splits
    assert parse_override("a=") == (["a"], None)  # YAML's empty value


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("training.max_steps", "expected KEY=VALUE"),
        ("=5", "the key before '=' is empty"),
        ("training..max_steps=5", "empty part"),
        ("training.max_steps.x=5", "training.max_steps is a number, not a mapping"),
        ("adapter.r=8", "adapter is a string, not a mapping"),
        ("training.seed=[1", "not valid YAML"),
    ],
)
def test_malformed_overrides_name_the_option(text: str, fragment: str) -> None:
    data = good()
    data["adapter"] = "spec.yaml"
    found = problems_of(data, (text,))
    assert list(found) == [f"--set {text}"] and fragment in found[f"--set {text}"], found


def test_a_bad_override_value_is_reported_at_the_field() -> None:
    found = problems_of(GOOD, ("training.max_steps=abc", "adapter.r=0"))
    assert found["$.training.max_steps"].startswith("expected an integer") and "$.adapter.r" in found


# paths


def test_check_paths_names_every_missing_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_train_file(GOOD, ("adapter=spec.yaml", "generation_check.data=gen.jsonl"))
    with pytest.raises(TrainConfigError) as caught:
        check_paths(config)
    found = dict(caught.value.problems)
    assert found == {
        "$.model": "model folder not found: model",
        "$.adapter": "adapter spec not found: spec.yaml",
        "$.data.train": "file not found: train.jsonl",
        "$.data.valid": "file not found: valid.jsonl",
        "$.generation_check.data": "file not found: gen.jsonl",
    }
    for name in ("train.jsonl", "valid.jsonl", "gen.jsonl", "spec.yaml"):
        Path(name).write_text("")
    Path("model").mkdir()
    with pytest.raises(TrainConfigError, match=r"\$\.model: model holds no config.json"):
        check_paths(config)
    Path("model/config.json").write_text("{}")
    check_paths(config)  # everything there
    Path("ad").mkdir()
    with pytest.raises(TrainConfigError, match=r"adapter folder ad holds no adapter_config\.json"):
        check_paths(load_train_file(GOOD, ("adapter=ad",)))


def test_is_train_file() -> None:
    assert is_train_file(GOOD)
    assert is_train_file({"model": "m", "data": "folder", "iters": 5})  # an mlx_lm.lora config
    assert not is_train_file({"peft_type": "LORA", "r": 4})
    assert not is_train_file({"peft_type": "LORA", "model": "m", "data": {}})
    assert not is_train_file(["model", "data"])


# peftdecl validate


def test_validate_accepts_training_files_and_names_their_problems(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("run.yaml").write_text(yaml.safe_dump(GOOD))
    bad = good()
    bad["training"]["warmup_steps"] = -1  # type: ignore[index]
    bad["adapter"]["r"] = 0  # type: ignore[index]
    Path("bad.json").write_text(json.dumps(bad))
    Path("spec.yaml").write_text("peft_type: LORA\nr: 4\n")
    Path("data").mkdir()
    Path("mlx.yaml").write_text("model: model\ndata: data\nnum_layers: -1\n")
    assert main(["validate", "run.yaml", "spec.yaml", "mlx.yaml"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "run.yaml: ok (training file, LORA)",
        "spec.yaml: ok (LORA)",
        "mlx.yaml: ok (mlx_lm.lora config, LORA)",
    ]
    assert main(["validate", "bad.json"]) == 1
    assert sorted(capsys.readouterr().out.splitlines()) == [
        "bad.json: $.adapter.r: must be >= 1, got 0",
        "bad.json: $.training.warmup_steps: must be >= 0, got -1",
    ]


# the published schema


def test_the_published_schema_is_fresh_and_agrees_with_the_loader() -> None:
    from referencing import Registry, Resource

    from peftdecl.schema import UNION_FILE, default_dir, render_all

    published = json.loads((default_dir() / SCHEMA_FILE).read_text(encoding="utf-8"))
    assert json.loads(render_all()[SCHEMA_FILE]) == published == train_schema()
    assert {"$ref": UNION_FILE} in published["properties"]["adapter"]["anyOf"]
    union = json.loads((default_dir() / UNION_FILE).read_text(encoding="utf-8"))
    registry = Registry().with_resource(union["$id"], Resource.from_contents(union))
    validator = jsonschema.Draft202012Validator(published, registry=registry)
    assert not list(validator.iter_errors(GOOD))
    bad = with_field("$.training.max_steps", 0)
    bad["adapter"]["r"] = 0  # type: ignore[index]
    paths = {"$" + "".join(f".{p}" for p in e.absolute_path) for e in validator.iter_errors(bad)}
    assert {"$.training.max_steps", "$.adapter"} <= {p.rsplit(".r", 1)[0] for p in paths}
    assert set(TrainFile.__struct_fields__) == set(published["properties"])


def test_train_file_from_dict_is_the_loader_without_reading() -> None:
    assert train_file_from_dict(GOOD) == load_train_file(GOOD)


def load_generator(name: str):
    """docs/<name>.py loaded as mkdocs loads a hook, with docs/ on sys.path meanwhile (for docs/_page.py)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "docs"))
    return module


def test_the_fine_tuning_page_lists_every_field_and_is_fresh() -> None:
    generator = load_generator("gen_train_reference")
    page = (ROOT / "docs" / "fine-tuning.md").read_text(encoding="utf-8")
    assert generator.regenerate(page) == page, "run: python docs/gen_train_reference.py"
    for path, _ in FIELDS:
        name = path.rsplit(".", 1)[1]
        assert f"| `{name}` |" in page, path
