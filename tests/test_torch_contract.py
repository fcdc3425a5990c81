"""The torch backend against the common contract: kind ops satisfy the Protocols of peftdecl.backend, the engine's
seeded generators make every random draw of the adapters reproducible from their saved state (and torch's global
generator plays no part), parameters keep their identity across update_spec and set_adapter (an optimizer built
before keeps training the live tensors), engine options replace the old module switches, and quantised base
layers are described in the inventory and refused at attach, naming the layer.

Tolerances: float64 results computed two ways ≤ 1e-12 relative.
"""

from __future__ import annotations

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import BackendError
from tests.assertions import assert_kind_ops_protocols, layer_kinds, lora_spec
from tests.conftest import rel_err

torch = pytest.importorskip("torch")
nn = torch.nn

from peftdecl_torch import TorchBackend  # noqa: E402
from peftdecl_torch.inventory import inventory  # noqa: E402

LORA = lora_spec(["a", "b"], r=2, alpha=4)


class Tiny(nn.Module):
    """y = b(tanh(a(x))), float64 unless told."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = nn.Linear(8, 8, dtype=dtype)
        self.b = nn.Linear(8, 8, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _x(rows: int = 6) -> torch.Tensor:
    return torch.randn(rows, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("kind", layer_kinds(TorchBackend.capabilities.kinds))
def test_every_kind_ops_satisfies_the_protocols(kind: str) -> None:
    from peftdecl_torch.kinds import ops_for

    ops = ops_for(kind)
    assert_kind_ops_protocols(ops)


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora", "vera", "loha", "lokr", "ia3", "oft", "boft"])
def test_forward_agrees_with_delta_or_composition(kind: str) -> None:
    """forward(x) (the whole output with one adapter, fused where it can be) equals base(x) + delta(x) and the
    accumulate fast path for an additive kind, and the composition of the base output or weight otherwise."""
    from peftdecl_torch.kinds import ops_for

    spec = {**RANDOM_SPECS.get(kind, {}), **CONTRACT_SPECS.get(kind, {})}
    model = peftdecl.attach(Tiny(), spec, seed=1).eval()  # eval: no random draws
    layer = model.engine.layer("a")
    name = layer.adapter_names[0]
    lp, p, ops, x = layer.plan(name), layer.tensors(name), ops_for(kind), _x()
    with torch.no_grad():
        y = ops.forward(lp, layer, p, x)
        base = layer.base_forward(x)
        if ops.additive:
            expected = [base + ops.delta(lp, layer, p, x), ops.accumulate(lp, layer, p, x, base.clone())]
        elif ops.composition(lp) == "output":
            expected = [ops.compose_output(lp, layer, p, x, base)]
        else:
            expected = [layer.functional(x, ops.compose_weight(lp, layer, p, layer.weight_ir()), layer.bias)]
    assert rel_err(base.numpy(), y.numpy()) > 1e-6  # the adapter does something
    for other in expected:
        assert rel_err(other.numpy(), y.numpy()) <= 1e-12


CONTRACT_SPECS = {
    "ia3": {
        "peft_type": "IA3",
        "target_modules": ["a", "b"],
        "feedforward_modules": [],
        "init_ia3_weights": False,
    }
}


# one spec per kind with a random draw in training: dropout masks, rank and module dropout, block dropout
RANDOM_SPECS = {
    "lora": {**LORA, "lora_dropout": 0.5},
    "dora": {**LORA, "use_dora": True, "lora_dropout": 0.5},
    "adalora": {
        "peft_type": "ADALORA",
        "init_r": 3,
        "target_r": 2,
        "total_step": 10,
        "lora_dropout": 0.5,
        "target_modules": ["a", "b"],
        "init_lora_weights": False,
    },
    "vera": {
        "peft_type": "VERA",
        "r": 4,
        "vera_dropout": 0.5,
        "target_modules": ["a", "b"],
        "init_weights": False,
    },
    "loha": {
        "peft_type": "LOHA",
        "r": 2,
        "rank_dropout": 0.5,
        "module_dropout": 0.3,
        "target_modules": ["a", "b"],
        "init_weights": False,
    },
    "lokr": {
        "peft_type": "LOKR",
        "r": 2,
        "rank_dropout": 0.5,
        "module_dropout": 0.3,
        "target_modules": ["a", "b"],
        "init_weights": False,
    },
    "oft": {
        "peft_type": "OFT",
        "oft_block_size": 2,
        "r": 0,
        "module_dropout": 0.5,
        "target_modules": ["a", "b"],
        "init_weights": False,
    },
    "boft": {
        "peft_type": "BOFT",
        "boft_block_size": 2,
        "boft_dropout": 0.5,
        "target_modules": ["a", "b"],
        "init_weights": False,
    },
}


def _draws(model: peftdecl.AdaptedModel, calls: int = 6) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(_x()) for _ in range(calls)]


@pytest.mark.parametrize("kind", sorted(RANDOM_SPECS))
def test_saved_generator_state_gives_the_same_random_draws(kind: str) -> None:
    model = peftdecl.attach(Tiny(), RANDOM_SPECS[kind], seed=1).train()
    state = model.engine.get_rng_state()
    assert set(state) == {"cpu"} and state["cpu"].dtype == np.uint8
    first = _draws(model)
    assert any(not torch.equal(first[0], y) for y in first[1:])  # each call draws anew
    model.engine.set_rng_state(state)
    torch.manual_seed(123)  # the global generator is not read
    again = _draws(model)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # the engine option seeds the generator: the same seed, the same draws; another seed, others
    seeded = [
        peftdecl.attach(Tiny(), RANDOM_SPECS[kind], seed=1, engine_options={"seed": s}).train()
        for s in (7, 7, 8)
    ]
    seven, seven_again, eight = (torch.cat(_draws(m)) for m in seeded)
    assert torch.equal(seven, seven_again)
    assert not torch.equal(seven, eight)


def test_update_spec_keeps_parameters_an_optimizer_was_built_on() -> None:
    """An optimizer built before update_spec (AdaLoRA's rank_pattern, as after rank allocation) keeps training the
    tensors the model runs: the same objects before and after, and its steps change the model's output."""
    spec = {**RANDOM_SPECS["adalora"], "lora_dropout": 0.0}
    model = peftdecl.attach(Tiny(), spec, seed=1)
    before = model.trainable_parameters()
    optimizer = torch.optim.SGD(before.values(), lr=0.1)
    pattern = {"a.lora_E": [True, False, True], "b.lora_E": [True, True, False]}
    model.update_spec(rank_pattern=pattern)
    after = model.trainable_parameters()
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    with torch.no_grad():
        masked = model(_x())  # the new plan runs: the pruned triplets are left out
    model.update_spec(rank_pattern=None)
    with torch.no_grad():
        assert rel_err(masked.numpy(), model(_x()).numpy()) > 1e-6
    model.update_spec(rank_pattern=pattern)
    model(_x()).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        assert rel_err(model(_x()).numpy(), masked.numpy()) > 1e-6  # the step reached the live tensors
    assert all(model.trainable_parameters()[k] is p for k, p in before.items())


def test_set_adapter_keeps_parameter_identity() -> None:
    model = peftdecl.attach(Tiny(), LORA, seed=1)
    model.add_adapter("other", LORA, seed=2)
    first = model.trainable_parameters()
    model.set_adapter("other")
    assert not any(p.requires_grad for p in first.values())
    model.set_adapter("default")
    assert all(model.trainable_parameters()[k] is p and p.requires_grad for k, p in first.items())


def test_engine_options_choose_the_fused_path_per_engine() -> None:
    """fused=False (formerly a module-wide switch) gives composed torch ops on that engine only; both agree."""
    x = _x().requires_grad_()
    fused = peftdecl.attach(Tiny(), LORA, seed=1)
    composed = peftdecl.attach(Tiny(), LORA, seed=1, engine_options={"fused": False})
    y_fused, y_composed = fused.engine.layer("a")(x), composed.engine.layer("a")(x)
    assert type(y_fused.grad_fn).__name__.endswith("LinearFunctionBackward")
    assert not type(y_composed.grad_fn).__name__.endswith("LinearFunctionBackward")
    assert rel_err(y_fused.detach().numpy(), y_composed.detach().numpy()) <= 1e-12
    with pytest.raises(BackendError, match="unknown engine options"):
        peftdecl.attach(Tiny(), LORA, engine_options={"gemm": "onednn"})


class Linear4bit(nn.Linear):
    """A stand-in for bitsandbytes' 4-bit linear layer: packed uint8 storage (recognised by its class name)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        self.weight = nn.Parameter(torch.zeros(d_in * d_out // 2, 1, dtype=torch.uint8), requires_grad=False)


class Quantised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.q4 = Linear4bit(8, 8)
        self.int8 = nn.Linear(8, 8)
        self.int8.weight = nn.Parameter(torch.ones(8, 8, dtype=torch.int8), requires_grad=False)
        self.bf16 = nn.Linear(8, 8, dtype=torch.bfloat16)


def test_inventory_reads_dtype_and_quantisation() -> None:
    layers = inventory(Quantised()).layers
    assert (layers["a"].dtype, layers["a"].quantization) == ("float32", None)
    assert (layers["bf16"].dtype, layers["bf16"].quantization) == ("bfloat16", None)
    assert (layers["q4"].type, layers["q4"].quantization) == ("linear", "bnb_4bit")
    assert (layers["q4"].in_features, layers["q4"].out_features) == (8, 8)
    assert (layers["int8"].dtype, layers["int8"].quantization) == ("int8", "unknown")


@pytest.mark.parametrize(("module", "label"), [("q4", "bnb_4bit"), ("int8", "unknown")])
def test_quantised_layers_are_refused_at_attach_by_name(module: str, label: str) -> None:
    base = Quantised()
    with pytest.raises(BackendError, match=f"{module}.*{label}"):
        peftdecl.attach(base, {**LORA, "target_modules": [module]})
    assert type(getattr(base, module)) is type(Quantised().get_submodule(module))  # nothing was wrapped
    peftdecl.attach(
        base, {**LORA, "target_modules": ["a", "bf16"]}
    )  # float layers of the same model are fine


def test_rank_allocator_runs_on_the_live_tensors() -> None:
    """AdaLoRA's allocator gets the live parameters and gradients as torch tensors (no CPU float64 copies) and its
    pruning lands in the live lora_E; the budget and mask equal those of the same allocator on NumPy copies."""
    from peftdecl_numpy.rank_allocator import RankAllocator
    from peftdecl_torch.kinds.adalora import update_and_allocate

    spec = {
        **RANDOM_SPECS["adalora"],
        "lora_dropout": 0.0,
        "tinit": 0,
        "tfinal": 1,
        "deltaT": 1,
        "total_step": 3,
    }
    model = peftdecl.attach(Tiny(torch.float32), spec, seed=1)
    seen: dict[str, torch.Tensor] = {}

    class Spy(RankAllocator):
        def update_and_allocate(self, step, params, grads):  # type: ignore[no-untyped-def]
            seen.update(params)
            seen.update({f"grad:{k}": v for k, v in grads.items()})
            return super().update_and_allocate(step, params, grads)

    allocator, twin = Spy(model.plan()), RankAllocator(model.plan())
    live = model.trainable_parameters()
    model(_x().float()).square().sum().backward()
    copies = {k: p.detach().double().numpy().copy() for k, p in live.items()}
    grads = {k: p.grad.double().numpy() for k, p in live.items()}
    for step in (1, 2):  # a masking step on the schedule, then the final one (target_r per layer)
        budget, mask = update_and_allocate(model, allocator, step)
        assert (budget, mask) == twin.update_and_allocate(step, copies, grads)
    for key, param in live.items():
        assert isinstance(seen[key], torch.Tensor) and seen[key].data_ptr() == param.data_ptr()
        assert seen[key].dtype == torch.float32 and seen[f"grad:{key}"].data_ptr() == param.grad.data_ptr()
    assert budget == 4 and sum(map(sum, mask.values())) == 4
    for module in ("a", "b"):
        pruned = ~np.asarray(mask[f"{module}.lora_E"])
        values = live[f"{module}.lora_E"].detach().numpy().ravel()
        assert not values[pruned].any() and values[~pruned].all()  # zeroed in the live tensor, the rest kept
        assert rel_err(values, copies[f"{module}.lora_E"].ravel()) <= 1e-6
