"""HF PEFT's ``PeftModel`` names on ``AdaptedModel`` (issue 10, item 2).

The table test walks every public name of the installed ``peft.PeftModel`` (class and instance), of its tuner
(``LoraModel``, reached through PeftModel's ``__getattr__``) and of ``PeftModelForCausalLM``: each must be
implemented by ``AdaptedModel``, passed through read-only, kept with a documented peftdecl meaning, or raise
``NotSupportedError`` (a PeftdeclError) naming what to use instead, so a new PEFT name fails it until handled.
The behaviour tests compare with PEFT on the same tiny Llama and the same adapter file: counts exactly, logits
within 1e-5 relative (float32; float64 after ``to(torch.float64)``: 1e-10).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import PeftdeclError
from peftdecl.peft_compat import BASE_READ_ONLY, NOT_SUPPORTED, PEFT_DEVIATIONS, NotSupportedError
from tests.conftest import rel_err
from tests.hf_models import peft, peft_model, perturb, tiny_llama, torch

TOL = 1e-5
IDS = torch.tensor([[3, 17, 42, 9, 77, 5], [64, 1, 8, 99, 23, 50]])
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])


def peft_names() -> set[str]:
    """Public names of PEFT's PeftModel API: class attributes, a live model's and its tuner's instance attributes."""
    live = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))
    owners = [peft.PeftModel, peft.PeftModelForCausalLM, type(live.base_model)]
    names = {n for cls in owners for n in dir(cls)}
    names |= set(vars(live)) | set(vars(live.base_model))
    return {n for n in names if not n.startswith("_")}


def saved_lora(folder, **overrides):
    wrapped = peft_model(tiny_llama(), peft.LoraConfig(**{**LORA, **overrides}))
    perturb(wrapped)
    wrapped.save_pretrained(folder)
    return wrapped


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_every_peft_name_is_handled(tmp_path) -> None:
    ours = peftdecl.attach(tiny_llama(), {"peft_type": "LORA", **LORA})
    implemented = {n for n in dir(peftdecl.AdaptedModel) if not n.startswith("_")}
    assert not implemented & set(NOT_SUPPORTED)  # a name is either offered or refused, not both
    unhandled, wrong = [], []
    for name in sorted(peft_names()):
        if name in NOT_SUPPORTED:
            try:
                getattr(ours, name)
                wrong.append(f"{name}: no error")
            except NotSupportedError as exc:
                if NOT_SUPPORTED[name] not in str(exc):
                    wrong.append(f"{name}: {exc}")
        elif name in implemented or name in PEFT_DEVIATIONS:
            getattr(ours, name)  # defined on AdaptedModel: reading it must work
        elif name in BASE_READ_ONLY:
            assert getattr(ours, name) is not None
        else:
            unhandled.append(name)
    assert not unhandled, f"PEFT names AdaptedModel neither implements nor refuses: {unhandled}"
    assert not wrong, wrong


@pytest.mark.parametrize("name", sorted(NOT_SUPPORTED))
def test_unsupported_names_raise_our_error(name: str) -> None:
    ours = peftdecl.attach(
        {"m.weight": np.ones((3, 2))}, {"peft_type": "LORA", "r": 1, "target_modules": ["m"]}
    )
    with pytest.raises(NotSupportedError, match=name) as info:
        getattr(ours, name)
    assert isinstance(info.value, PeftdeclError) and not hasattr(ours, name)


def test_nothing_else_reaches_the_base_model() -> None:
    base = tiny_llama()
    ours = peftdecl.attach(base, {"peft_type": "LORA", **LORA})
    assert ours.config is base.config and ours.device == base.device  # the read-only list
    for name in ("resize_token_embeddings", "tie_weights", "post_init", "gradient_checkpointing_enable"):
        assert hasattr(base, name)
        with pytest.raises(AttributeError, match="get_base_model"):
            getattr(ours, name)


@pytest.mark.parametrize(
    "config",
    [
        dict(LORA),
        dict(LORA, modules_to_save=["lm_head"]),
        dict(LORA, use_dora=True),
        dict(r=2, target_modules=["embed_tokens", "o_proj"]),
    ],
    ids=["lora", "modules_to_save", "dora", "embedding"],
)
def test_parameter_counts_and_printed_line_equal_peft(config, capsys) -> None:
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    ours = peftdecl.attach(tiny_llama(), {"peft_type": "LORA", **config})
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected


def test_numpy_and_mlx_counts_equal_torch() -> None:
    from peftdecl_torch.inventory import numpy_model

    spec = {"peft_type": "LORA", **LORA}
    torch_counts = peftdecl.attach(tiny_llama(), spec).get_nb_trainable_parameters()
    state, layer_types, facts = numpy_model(tiny_llama())
    numpy_counts = peftdecl.attach(dict(state), spec, layer_types=layer_types, **facts)
    assert numpy_counts.get_nb_trainable_parameters() == torch_counts
    pytest.importorskip("mlx.core")
    from tests.mlx_models import tiny_llama as mlx_llama

    mlx_model = peftdecl.attach(mlx_llama(), spec)
    trainable, total = mlx_model.get_nb_trainable_parameters()
    assert trainable == 2 * 2 * 4 * (32 + 32) - 2 * 4 * (32 - 16)  # q: 32→32, v: 32→16 (2 KV heads of 8)
    assert total > trainable


def test_disable_merge_unmerge_and_unload_like_peft(tmp_path) -> None:
    theirs = saved_lora(tmp_path)
    ours = peftdecl.load_adapter(tiny_llama(), tmp_path, is_trainable=True).eval()
    theirs.eval()
    base = logits(tiny_llama())
    with theirs.disable_adapter(), ours.disable_adapter():
        assert rel_err(logits(ours).numpy(), logits(theirs).numpy()) <= TOL
        assert torch.equal(logits(ours), base)
        assert not ours.has_active_enabled_adapter
    assert rel_err(logits(ours).numpy(), logits(theirs).numpy()) <= TOL
    ours.disable_adapter_layers()
    assert torch.equal(logits(ours), base)
    ours.enable_adapter_layers()
    theirs.merge_adapter()
    ours.merge_adapter()
    assert ours.merged_adapters == ("default",)
    assert rel_err(logits(ours).numpy(), logits(theirs).numpy()) <= TOL
    q = "model.layers.0.self_attn.q_proj"
    merged_theirs = theirs.get_base_model().get_submodule(q).base_layer.weight.detach().numpy()
    assert rel_err(ours.base_weight(q), merged_theirs) <= TOL
    theirs.unmerge_adapter()
    ours.unmerge_adapter()
    assert rel_err(logits(ours).numpy(), logits(theirs).numpy()) <= TOL
    ours.merge_adapter()
    plain = ours.unload()  # the original base: merged weights taken out again
    assert type(plain).__name__ == "LlamaForCausalLM" and torch.allclose(logits(plain), base, atol=1e-6)
    assert not any("AdaptedLayer" in type(m).__name__ for m in plain.modules())


def test_merge_and_unload_keywords(tmp_path) -> None:
    theirs = saved_lora(tmp_path)
    ours = peftdecl.load_adapter(tiny_llama(), tmp_path)
    expected = logits(theirs.eval().merge_and_unload(safe_merge=True, adapter_names=["default"]))
    got = logits(ours.merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["default"]))
    assert rel_err(got.numpy(), expected.numpy()) <= TOL


def test_state_and_config_names_like_peft(tmp_path) -> None:
    theirs = saved_lora(tmp_path)
    theirs.load_adapter(tmp_path, "other")
    ours = peftdecl.load_adapter(tiny_llama(), tmp_path)
    ours.load_adapter(tmp_path, "other")
    assert ours.active_adapter == theirs.active_adapter == "default"
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert set(ours.peft_config) == set(theirs.peft_config)
    assert ours.peft_config["other"].r == theirs.peft_config["other"].r
    assert ours.peft_type == str(theirs.peft_type.value)
    assert ours.active_peft_config is ours.peft_config["default"]
    assert ours.targeted_module_names == theirs.targeted_module_names
    assert ours.modules_to_save is theirs.modules_to_save is None
    assert ours.get_base_model() is ours.base_model
    assert ours.base_model_torch_dtype == theirs.base_model_torch_dtype == torch.float32
    ours.set_adapter("other")
    ours.set_requires_grad("other", False)
    assert ours.trainable_parameters() == {}
    ours.set_requires_grad(["other"])
    assert ours.trainable_parameters()


def test_save_pretrained_writes_the_adapter_that_peft_loads(tmp_path) -> None:
    saved_lora(tmp_path / "src")
    ours = peftdecl.load_adapter(tiny_llama(), tmp_path / "src")
    ours.load_adapter(tmp_path / "src", "other")
    ours.save_pretrained(tmp_path / "out", selected_adapters=["default"])
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]  # no base checkpoint, no "other"
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out")
    assert rel_err(logits(ours).numpy(), logits(theirs).numpy()) <= TOL
    ours.save_pretrained(tmp_path / "none", is_main_process=False)
    assert not (tmp_path / "none").exists()
    with pytest.raises(NotSupportedError, match="safetensors"):
        ours.save_pretrained(tmp_path / "bin", safe_serialization=False)


def test_to_moves_and_casts_base_and_adapters_together(tmp_path) -> None:
    theirs = saved_lora(tmp_path)
    ours = peftdecl.load_adapter(tiny_llama(), tmp_path)
    assert ours.to(torch.float64) is ours
    assert {p.dtype for p in ours.parameters()} == {torch.float64}
    theirs = theirs.eval().to(torch.float64)
    assert rel_err(logits(ours).numpy(), logits(theirs).numpy()) <= 1e-10
    assert ours.float() is ours and logits(ours).dtype == torch.float32
    assert ours.cpu() is ours and ours.device == torch.device("cpu")


def test_to_is_refused_where_arrays_cannot_move() -> None:
    ours = peftdecl.attach(
        {"m.weight": np.ones((3, 2))}, {"peft_type": "LORA", "r": 1, "target_modules": ["m"]}
    )
    with pytest.raises(NotSupportedError, match=r"to\(\)"):
        ours.to("float32")
    with pytest.raises(NotSupportedError):
        ours.double()


def test_generate_equals_peft_greedy(tmp_path) -> None:
    theirs = saved_lora(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ours = peftdecl.load_adapter(tiny_llama(), tmp_path)
    kwargs = dict(input_ids=IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = theirs.generate(**kwargs)
    assert torch.equal(ours.generate(**kwargs), expected)
    assert torch.equal(ours.generate(**kwargs), expected)  # inference mode: no dropout between runs


def test_peft_loading_keywords(tmp_path) -> None:
    saved_lora(tmp_path)
    ours = peftdecl.load_adapter(tiny_llama(), tmp_path)
    ours.load_adapter(
        tmp_path, "other", False, torch_device=None, low_cpu_mem_usage=False, autocast_adapter_dtype=True
    )
    ours.add_adapter("new", {"peft_type": "LORA", **LORA}, low_cpu_mem_usage=False)
    with pytest.raises(NotSupportedError, match="low_cpu_mem_usage"):
        ours.load_adapter(tmp_path, "x", low_cpu_mem_usage=True)
    with pytest.raises(NotSupportedError, match="token"):
        ours.add_adapter("y", {"peft_type": "LORA", **LORA}, token="hf_...")
    assert set(ours.peft_config) == {"default", "other", "new"}
