"""Assertions the HF-parity tests share: peftdecl's float64 NumPy reference against the real HF PEFT (float32).

Tolerances: merged weights ≤ MERGE_TOL relative (float32 files; PEFT merges in float32, the reference in
float64); one layer's output ≤ OUTPUT_TOL relative (PEFT's float32 layer on a float32 input vs the float64
reference).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import peftdecl
from tests.conftest import rel_err
from tests.hf_models import merged_state, numpy_inputs, peft, peft_model, perturb, tiny_llama, torch

MERGE_TOL = 1e-6  # merged weights: float32 PEFT vs the float64 reference on float32 files
OUTPUT_TOL = 1e-5  # one layer's output: PEFT's float32 forward vs the float64 reference


def llama_with_bias() -> Any:
    """Tiny Llama with attention biases set to random values (transformers initialises them to zero)."""
    model = tiny_llama(attention_bias=True)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def assert_merged_equal(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> None:
    """The same tensor names, and each merged tensor within MERGE_TOL (relative) of PEFT's."""
    assert set(ours) == set(theirs)
    for key in theirs:
        assert rel_err(ours[key], theirs[key]) <= MERGE_TOL, key


def peft_layer_output(wrapped: Any, module: str, x: np.ndarray) -> np.ndarray:
    """PEFT's output of one wrapped submodule, as float64: token ids go in as int64, anything else as float32."""
    layer = wrapped.base_model.model.get_submodule(module)
    tensor = torch.tensor(x, dtype=torch.long if x.dtype.kind == "i" else torch.float32)
    with torch.no_grad():
        return layer(tensor).double().numpy()


def probe_inputs(
    ours: peftdecl.AdaptedModel, probes: dict[str, Any], seed: int = 11
) -> dict[str, np.ndarray]:
    """Inputs for the probed modules ``ours`` targets, drawn in the order of ``probes``: a probe is an input
    shape (standard normal) or a function of the generator."""
    rng = np.random.default_rng(seed)
    targets = ours.plan().targets
    return {
        module: probe(rng) if callable(probe) else rng.normal(size=probe)
        for module, probe in probes.items()
        if module in targets
    }


def assert_layers_like_peft(ours: peftdecl.AdaptedModel, wrapped: Any, inputs: dict[str, np.ndarray]) -> None:
    """For each module (at least one), our output within OUTPUT_TOL (relative) of PEFT's wrapped submodule."""
    assert inputs
    for module, x in inputs.items():
        assert rel_err(ours(module, x), peft_layer_output(wrapped, module, x)) <= OUTPUT_TOL, module


def load_peft_saved(
    make: Callable[[], Any], config: Any, folder: str | Path, perturbed: bool = True, **load: Any
) -> tuple[Any, peftdecl.AdaptedModel]:
    """PEFT wraps ``make()`` with ``config`` (seeded), perturbs its adapter tensors unless told not to and saves
    it to ``folder``; peftdecl's NumPy reference loads that folder onto a fresh ``make()``. Returns both."""
    wrapped = peft_model(make(), config)
    if perturbed:
        perturb(wrapped)
    wrapped.save_pretrained(folder)
    state, options = numpy_inputs(make())
    return wrapped, peftdecl.load_adapter(state, folder, **load, **options)


def round_trip(
    make: Callable[[], Any], config: Any, folder: Path, inputs: dict[str, np.ndarray]
) -> tuple[peftdecl.AdaptedModel, Any]:
    """PEFT's file (in ``folder / "theirs"``) loads with PEFT's outputs on ``inputs``, and what we save from it
    (``folder / "ours"``) loads in PEFT. Returns (ours, PEFT's model loaded from our file)."""
    wrapped, ours = load_peft_saved(make, config, folder / "theirs")
    assert_layers_like_peft(ours, wrapped, inputs)
    ours.save(folder / "ours")
    return ours, peft.PeftModel.from_pretrained(make(), folder / "ours")


def save_for_peft(
    make: Callable[[], Any], spec: Any, folder: str | Path, seed: int = 3
) -> tuple[peftdecl.AdaptedModel, Any]:
    """peftdecl attaches ``spec`` to ``make()`` (seeded) and saves it to ``folder``; PEFT loads that folder onto a
    fresh ``make()``. Returns (ours, PEFT's loaded model)."""
    state, options = numpy_inputs(make())
    ours = peftdecl.attach(state, spec, seed=seed, **options)
    ours.save(folder)
    return ours, peft.PeftModel.from_pretrained(make(), folder)


def assert_computes_like_peft(
    ours: peftdecl.AdaptedModel, wrapped: Any, inputs: dict[str, np.ndarray]
) -> None:
    """Each module's output on ``inputs`` within OUTPUT_TOL of PEFT's, then the merged weights within
    MERGE_TOL (the merge unloads ``ours``)."""
    assert_layers_like_peft(ours, wrapped, inputs)
    assert_merged_equal(ours.merge_and_unload(), merged_state(wrapped))


def assert_saved_like_peft(folder: str | Path, reference: Any, shapes: bool = False) -> dict[str, Any]:
    """The adapter file in ``folder`` holds exactly the tensor names (and with ``shapes``, the shapes) of
    PEFT's get_peft_model_state_dict(reference). Returns the file's tensors."""
    saved = peft.utils.load_peft_weights(str(folder))
    expected = peft.get_peft_model_state_dict(reference)
    assert set(saved) == set(expected)
    if shapes:
        assert {k: tuple(v.shape) for k, v in saved.items()} == {
            k: tuple(v.shape) for k, v in expected.items()
        }
    return saved


def assert_config_like_peft(
    ours: str | Path,
    theirs: str | Path,
    ignore: tuple[str, ...] = (),
    as_sets: tuple[str, ...] = ("target_modules",),
) -> tuple[dict, dict]:
    """adapter_config.json in folder ``ours`` has the fields of the one in ``theirs`` (PEFT's), with equal
    values except the fields in ``ignore``; ``as_sets`` fields are compared as unordered collections. Returns
    both configs."""
    mine = json.loads((Path(ours) / "adapter_config.json").read_text())
    peft_config = json.loads((Path(theirs) / "adapter_config.json").read_text())
    assert set(mine) == set(peft_config)
    for key in as_sets:
        assert set(mine[key]) == set(peft_config[key]), key
    differing = {k for k in peft_config if k not in (*ignore, *as_sets) and mine[k] != peft_config[k]}
    assert not differing, {k: (mine[k], peft_config[k]) for k in differing}
    return mine, peft_config


def live_config(wrapped: Any) -> dict[str, Any]:
    """A live PEFT model's config as a peftdecl spec (sets as lists, training mode)."""
    config = json.loads(json.dumps(wrapped.peft_config["default"].to_dict(), default=sorted))
    return {**config, "inference_mode": False}


def prompt_configs(task_type: str, tokens: int) -> dict[str, Callable[[], Any]]:
    """PEFT prompt-learning configs by name, ``tokens`` virtual tokens each: "prompt" (prompt tuning), "prefix"
    (prefix tuning) and "prefix_projection" (prefix tuning through a 16-wide encoder)."""
    return {
        "prompt": lambda: peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=tokens),
        "prefix": lambda: peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=tokens),
        "prefix_projection": lambda: peft.PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=tokens, prefix_projection=True, encoder_hidden_size=16
        ),
    }


def peft_prompt_model(make: Callable[[], Any], config: Any) -> Any:
    """``get_peft_model(make(), config)`` with torch seeded 1234 before ``make()`` builds the base (which seeds
    itself), so the adapter's initial values follow on from the base model's draws."""
    torch.manual_seed(1234)
    return peft.get_peft_model(make(), config)


def load_peft_saved_prompt(make: Callable[[], Any], config: Any, folder: str | Path) -> tuple[Any, Any]:
    """PEFT wraps ``make()`` with the prompt-learning ``config`` (peft_prompt_model) and saves it to ``folder``;
    peftdecl loads that folder onto a fresh ``make()`` (a torch model: the torch backend). Returns both."""
    wrapped = peft_prompt_model(make, config)
    wrapped.save_pretrained(folder)
    return wrapped, peftdecl.load_adapter(make(), folder)


def prompt_key(peft_name: str) -> str:
    """PEFT's name for a trainable parameter of a prompt-learning model -> peftdecl's key: the prompt encoder's
    tensors lose their prefix, a modules_to_save copy its adapter level (no tuner model sits between PeftModel and
    the base model here, so its name starts with ``base_model.`` alone)."""
    key = peft_name.removeprefix("prompt_encoder.default.").removeprefix("base_model.")
    return key.replace(".modules_to_save.default.", ".")


def assert_prompt_training_like_peft(
    wrapped: Any, base: Any, tol: float, **batch: Any
) -> peftdecl.AdaptedModel:
    """A prompt-learning adapter attached from PEFT's live config and values gives PEFT's loss and gradients
    (relative ≤ ``tol``), modules_to_save copies included; both models run in eval mode so the base model's own
    dropout draws no masks. Returns the adapter attached here."""
    trained = peftdecl.attach(base, live_config(wrapped), seed=0)
    params = trained.trainable_parameters()
    theirs = {prompt_key(k): p for k, p in wrapped.named_parameters() if p.requires_grad}
    if "prompt_embeddings" in params:  # without a projection PEFT's table is its encoder's embedding
        theirs = {"prompt_embeddings": theirs.pop("embedding.weight"), **theirs}
    assert set(params) == set(theirs)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(theirs[key])
    wrapped.eval()
    trained.eval()
    assert_loss_and_gradients_like_peft(wrapped, trained, theirs, tol, batch)
    return trained


def _host(t: Any) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def assert_loss_and_gradients_like_peft(
    wrapped: Any, ours: Any, theirs: dict[str, Any], tol: float, batch: dict[str, Any]
) -> None:
    """Both models' loss on ``batch`` (relative ≤ ``tol``), then, after both backward passes, the gradient of each
    of our trainable parameters against PEFT's parameter of the same key in ``theirs``."""
    loss_theirs, loss_ours = wrapped(**batch).loss, ours(**batch).loss
    assert rel_err(loss_ours.item(), loss_theirs.item()) <= tol
    loss_theirs.backward()
    loss_ours.backward()
    for key, param in ours.trainable_parameters().items():
        assert rel_err(_host(param.grad), _host(theirs[key].grad)) <= tol, key


def assert_training_step_like_peft(
    wrapped: Any, ours: peftdecl.AdaptedModel, theirs_params: dict[str, Any], tol: float, **batch: Any
) -> None:
    """In training mode, on any device: the same trainable set, loss, gradients and parameters after one SGD
    step as PEFT (relative ≤ ``tol``); ``theirs_params`` maps peftdecl's keys to PEFT's parameters. AdaLoRA's
    orthogonality term is added to our loss, as PeftModelForCausalLM adds it to PEFT's."""
    wrapped.train()
    ours.train()
    params = ours.trainable_parameters()
    assert set(params) == set(theirs_params)
    loss_theirs = wrapped(**batch).loss
    loss_ours = ours(**batch).loss
    if ours.plan().kind == "adalora":
        from peftdecl_torch.kinds.adalora import orthogonal_regularizer

        loss_ours = loss_ours + orthogonal_regularizer(ours.plan(), params)
    assert rel_err(loss_ours.item(), loss_theirs.item()) <= tol
    loss_theirs.backward()
    loss_ours.backward()
    for key, param in params.items():
        assert rel_err(_host(param.grad), _host(theirs_params[key].grad)) <= tol, key
    torch.optim.SGD(list(params.values()), lr=0.5).step()
    torch.optim.SGD(list(theirs_params.values()), lr=0.5).step()
    for key, param in params.items():
        assert rel_err(_host(param), _host(theirs_params[key])) <= tol, key
