"""Targeting reproduces HF PEFT's rules: checked against PEFT's own matcher on generated module names."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from peftdecl.errors import TargetError
from peftdecl.plan import LayerInfo, ModelInfo
from peftdecl.plan.targeting import is_targeted, pattern_value, resolve_target_modules

peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "proj", "dense", "lm_head"]
CONTAINERS = ["model", "layers", "h", "blocks", "self_attn", "mlp", "encoder", "attn"]

segment = st.sampled_from(CONTAINERS) | st.integers(0, 3).map(str)
module_names = st.builds(
    lambda parts, leaf: ".".join([*parts, leaf]),
    st.lists(segment, min_size=0, max_size=5),
    st.sampled_from(LEAVES),
)
target_lists = st.lists(
    st.sampled_from([*LEAVES, "self_attn.q_proj", "mlp.down_proj", "layers.0.self_attn.v_proj"]),
    min_size=1,
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(
    key=module_names,
    targets=target_lists | st.sampled_from([r".*\.(q|v)_proj", r"model\..*", r".*proj"]),
    exclude=st.none() | st.lists(st.sampled_from(LEAVES), max_size=2) | st.just(r".*layers\.1\..*"),
    layers=st.none() | st.integers(0, 3) | st.lists(st.integers(0, 3), min_size=1, max_size=2),
    pattern=st.none() | st.sampled_from(["layers", "h", "blocks"]) | st.just(["h", "layers"]),
    to_save=st.none() | st.lists(st.sampled_from(["lm_head", "dense", "mlp"]), min_size=1, max_size=2),
)
def test_matches_peft_check_target_module_exists(key, targets, exclude, layers, pattern, to_save) -> None:
    if isinstance(targets, str):
        layers = pattern = None  # PEFT forbids layer selection with a regex
    if layers is None:
        pattern = None
    fields = dict(target_modules=targets, exclude_modules=exclude, layers_to_transform=layers,
                  layers_pattern=pattern, modules_to_save=to_save)  # fmt: skip
    theirs = bool(check_target_module_exists(peft.LoraConfig(**fields), key))
    ours = peftdecl.load_spec({"peft_type": "LORA", **fields})
    assert is_targeted(key, ours, resolve_target_modules(ours, _info([key]))) == theirs


@settings(max_examples=200, deadline=None)
@given(
    key=module_names,
    patterns=st.dictionaries(st.sampled_from([*LEAVES, "self_attn.q_proj", "layers.0.self_attn.q_proj", "q.*"]),
                             st.integers(1, 16), max_size=3),
)  # fmt: skip
def test_rank_pattern_lookup_matches_peft(key, patterns) -> None:
    expected_key = get_pattern_key(list(patterns), key)
    expected = patterns.get(expected_key, -1)
    assert pattern_value(patterns, key, -1) == expected


def _info(names: list[str], head: str | None = None) -> ModelInfo:
    return ModelInfo(
        layers={n: LayerInfo("linear", 4, 4) for n in names}, output_head=head, model_type="llama"
    )


def test_all_linear_skips_the_output_head_and_non_linear_layers() -> None:
    info = ModelInfo(
        layers={
            "model.embed_tokens": LayerInfo("embedding", 10, 4),
            "model.layers.0.q_proj": LayerInfo("linear", 4, 4),
            "model.layers.0.c_attn": LayerInfo("gpt2_conv1d", 4, 12),
            "model.conv": LayerInfo("conv2d", 3, 4, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0),
                                    dilation=(1, 1)),
            "lm_head": LayerInfo("linear", 4, 10),
        },
        output_head="lm_head",
    )  # fmt: skip
    plan = peftdecl.compile_plan(
        peftdecl.load_spec({"peft_type": "LORA", "target_modules": "ALL-LINEAR"}), info
    )
    assert plan.targets == ("model.layers.0.q_proj", "model.layers.0.c_attn")


def test_nothing_matched_lists_the_closest_names() -> None:
    info = _info(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"])
    with pytest.raises(TargetError, match="closest module names: q_proj"):
        peftdecl.compile_plan(peftdecl.load_spec({"peft_type": "LORA", "target_modules": ["qproj"]}), info)


def test_default_targets_follow_the_model_type() -> None:
    info = _info(
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.o_proj"]
    )
    plan = peftdecl.compile_plan(peftdecl.load_spec({"peft_type": "LORA"}), info)
    assert plan.targets == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
    unknown = ModelInfo(layers={"a": LayerInfo("linear", 2, 2)}, model_type="mystery")
    with pytest.raises(TargetError, match="no default for model type 'mystery'"):
        peftdecl.compile_plan(peftdecl.load_spec({"peft_type": "LORA"}), unknown)


def test_unsupported_layer_type_is_refused_by_name() -> None:
    info = ModelInfo(layers={"emb": LayerInfo("embedding", 10, 4)})
    with pytest.raises(TargetError, match=r"emb \(embedding\) cannot be adapted: LOHA supports"):
        peftdecl.compile_plan(peftdecl.load_spec({"peft_type": "LOHA", "target_modules": ["emb"]}), info)


@pytest.mark.parametrize("peft_type", ["LORA", "ADALORA", "LOHA", "LOKR", "OFT", "BOFT", "VERA", "IA3"])
def test_default_target_tables_match_peft(peft_type) -> None:
    from peft.utils import constants

    from peftdecl.plan.targeting import default_targets

    theirs = getattr(constants, f"TRANSFORMERS_MODELS_TO_{peft_type}_TARGET_MODULES_MAPPING")
    for model_type, targets in default_targets(peft_type).items():
        assert list(targets) == list(theirs[model_type]), model_type
