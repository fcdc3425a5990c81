"""Torch wrapped layers expose their base layer's attributes as HF PEFT's do; LoKr on Conv1d with effective conv.

The models' forwards read attributes of the layers that get adapted (``self.conv2d.weight``, ``.bias``,
``self.lin1.in_features``), as models in HF PEFT's own custom-model tests do. PEFT wraps one copy, its adapter
tensors are perturbed away from their initial (identity) values and saved; the torch backend loads that folder onto
a fresh copy. Tolerances (float32 on both sides): outputs ≤ 1e-5 relative, merged weights ≤ 1e-6 relative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import peftdecl
from peftdecl.plan import LayerInfo
from tests.conftest import rel_err, selected_backends
from tests.hf_models import peft, perturb, torch

if "torch" not in selected_backends():
    pytest.skip("the torch backend is not selected", allow_module_level=True)

pytestmark = pytest.mark.peft
nn = torch.nn

OUTPUT_TOL = 1e-5  # float32 model outputs, ours vs PEFT's
MERGE_TOL = 1e-6  # float32 merged weights, ours vs PEFT's


class ReadsAttributes(nn.Module):
    """lin0 -> a (grouped) Conv2d -> lin1; the forward reads the conv's weight and bias and lin1's in_features."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 8 * 4 * 4)
        self.conv2d = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.lin1 = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: Any) -> Any:
        x = self.lin0(x.to(self.conv2d.weight.dtype)).reshape(-1, 8, 4, 4)
        x = torch.relu(self.conv2d(x.to(self.conv2d.weight.device)))
        if self.conv2d.bias is not None:  # a model branching on its layer's bias
            x = x - self.conv2d.bias.detach().mean()
        return self.lin1(x.reshape(-1, self.lin1.in_features))


class Conv1dBigger(nn.Module):
    """HF PEFT's ``ModelConv1DBigger`` shape: one Conv1d(64, 16, 2) over a 10-long signal, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1d = nn.Conv1d(64, 16, 2)
        self.lin0 = nn.Linear(16 * 9, 2)

    def forward(self, x: Any) -> Any:
        x = torch.cat([x.reshape(-1, 1, 10)] * 64, dim=1)
        return self.lin0(torch.relu(self.conv1d(x)).flatten(1))


def peft_and_ours(make: Any, config: Any, folder: Path) -> tuple[Any, peftdecl.AdaptedModel]:
    """PEFT's ``config`` on ``make()`` (seeded, perturbed, saved in ``folder``) and ours loaded from it."""
    torch.manual_seed(1234)
    wrapped = peft.get_peft_model(make(), config)
    perturb(wrapped)
    wrapped.save_pretrained(folder)
    return wrapped, peftdecl.load_adapter(make(), folder)


def assert_like_peft(wrapped: Any, ours: peftdecl.AdaptedModel, x: Any) -> None:
    """Outputs ≤ OUTPUT_TOL, then merged weights ≤ MERGE_TOL (both relative), ours against PEFT's."""
    with torch.no_grad():
        assert rel_err(ours(x).numpy(), wrapped(x).numpy()) <= OUTPUT_TOL
    theirs = wrapped.merge_and_unload().state_dict()
    merged = ours.merge_and_unload().state_dict()
    assert set(merged) == set(theirs)
    for key, value in merged.items():
        assert rel_err(value.numpy(), theirs[key].numpy()) <= MERGE_TOL, key


ATTRIBUTE_CASES = {
    # LoRA on grouped convolutions is another piece of work: LoRA runs on a plain conv here
    "lora": (1, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv2d", "lin1"])),
    "loha": (2, lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["conv2d", "lin1"])),
    "lokr": (2, lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["conv2d", "lin1"])),
}


@pytest.mark.parametrize("kind", sorted(ATTRIBUTE_CASES))
def test_model_reading_layer_attributes_runs_like_peft(kind: str, tmp_path: Path) -> None:
    groups, config = ATTRIBUTE_CASES[kind]
    wrapped, ours = peft_and_ours(lambda: ReadsAttributes(groups), config(), tmp_path)
    for module in ("conv2d", "lin1"):
        mine, peft_layer = (
            ours.base_model.get_submodule(module),
            wrapped.base_model.model.get_submodule(module),
        )
        base = mine.get_base_layer()
        assert type(base) is type(peft_layer.get_base_layer())
        assert mine.weight is base.weight and mine.bias is base.bias
        assert (mine.in_features, mine.out_features) == (peft_layer.in_features, peft_layer.out_features)
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(3))
    assert_like_peft(wrapped, ours, x)


def every_layer_type() -> Any:
    """One layer of each torch type peftdecl adapts (a fresh copy per call)."""
    return nn.ModuleDict(
        {
            "emb": nn.Embedding(11, 6, padding_idx=0),
            "conv1": nn.Conv1d(4, 6, 3, stride=2, padding=1),
            "conv2": nn.Conv2d(4, 6, (3, 1), dilation=2),
            "lin": nn.Linear(6, 5, bias=False),
        }
    )


def test_attributes_of_every_layer_type_are_peft_s() -> None:
    """in_features/out_features of each layer type as PEFT's LoRA layers give them (channels for convolutions,
    rows and width for embeddings); every other public attribute is the base layer's own."""
    names = ["emb", "conv1", "conv2", "lin"]
    wrapped = peft.get_peft_model(every_layer_type(), peft.LoraConfig(r=2, target_modules=names))
    ours = peftdecl.attach(every_layer_type(), {"peft_type": "LORA", "r": 2, "target_modules": names})
    plain = every_layer_type()
    for name in names:
        mine, theirs, base = ours.base_model[name], wrapped.base_model.model[name], plain[name]
        assert (mine.in_features, mine.out_features) == (theirs.in_features, theirs.out_features), name
        assert mine.weight.shape == base.weight.shape and (mine.bias is None) == (
            getattr(base, "bias", None) is None
        ), name
    assert ours.base_model["emb"].padding_idx == 0
    assert ours.base_model["conv1"].stride == (2,) and ours.base_model["conv1"].padding == (1,)
    assert ours.base_model["conv2"].kernel_size == (3, 1) and ours.base_model["conv2"].dilation == (2, 2)
    assert ours.base_model["conv2"].groups == 1 and ours.base_model["conv2"].in_channels == 4


def test_own_attributes_win_and_private_ones_stay_with_the_base() -> None:
    base = nn.Linear(6, 4)
    base.info = "the base layer's"  # names the wrapper uses for itself
    base.adapter_names = "the base layer's"
    base.custom_scale = 2.5
    base._private_hook = object()
    spec = {"peft_type": "LORA", "r": 2, "target_modules": ["lin"]}
    ours = peftdecl.attach(nn.ModuleDict({"lin": base}), spec, name="a")
    wrapper = ours.base_model["lin"]
    assert wrapper.get_base_layer() is base
    assert isinstance(wrapper.info, LayerInfo) and wrapper.adapter_names == ("a",)
    assert wrapper.custom_scale == 2.5 and "lora_A" in dict(wrapper.named_children())
    assert not hasattr(wrapper, "_private_hook")
    with pytest.raises(AttributeError, match="no_such_attribute"):
        _ = wrapper.no_such_attribute


def test_quantised_base_weight_is_its_params4bit_as_in_peft() -> None:
    bnb = pytest.importorskip("bitsandbytes")

    def make() -> Any:
        torch.manual_seed(0)
        layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
        layer.load_state_dict(nn.Linear(64, 32).state_dict())
        layer = layer.to("cpu")
        layer.support_avx512bf16_for_cpu = False
        return nn.ModuleDict({"q": layer})

    ours = peftdecl.attach(make(), {"peft_type": "LORA", "r": 2, "target_modules": ["q"]})
    wrapped = peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules=["q"]))
    mine, theirs = ours.base_model["q"], wrapped.base_model.model["q"]
    assert mine.weight is mine.get_base_layer().weight
    assert type(mine.weight).__name__ == type(theirs.weight).__name__ == "Params4bit"
    assert mine.weight.quant_state is not None


LOKR_CONV1D = {
    "effective_conv": {"use_effective_conv2d": True},
    "effective_conv_decompose_both": {"use_effective_conv2d": True, "decompose_both": True},
    "plain": {"use_effective_conv2d": False},
}


@pytest.mark.parametrize("case", sorted(LOKR_CONV1D))
def test_lokr_on_conv1d_like_peft(case: str, tmp_path: Path) -> None:
    """HF PEFT's "Conv1d LOKR 3/4" rows: LoKr r=2 on a Conv1d(64, 16, kernel 2), forward and merged."""
    config = peft.LoKrConfig(target_modules=["conv1d"], r=2, **LOKR_CONV1D[case])
    wrapped, ours = peft_and_ours(Conv1dBigger, config, tmp_path)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(5))
    assert_like_peft(wrapped, ours, x)
