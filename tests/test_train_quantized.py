"""QLoRA through ``peftdecl train``: ``model.quantization`` in the training file (its rules, with JSON paths), the
quantised base loaded by each backend, and short runs over a 4-bit and an 8-bit bitsandbytes base (torch) and an
MLX affine 4-bit base whose saved adapters load in HF PEFT / mlx-lm over the same quantised model.

The peers quantise the model themselves: transformers' ``from_pretrained(quantization_config=BitsAndBytesConfig)``
and ``mlx_lm.convert -q``. Both sides then run the very same quantised layers, so logits through the saved adapter
agree to ≤ 1e-5 relative (float32 rounding of the adapter arithmetic only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from peftdecl.cli import main
from peftdecl.errors import PeftdeclError, TrainConfigError
from peftdecl.train.config import QuantizationConfig
from peftdecl.train.load import check_paths, load_train_file
from peftdecl.train.tiny_model import build_tiny_llama
from tests.conftest import rel_err, selected_backends

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "finetune"
TOL = 1e-5  # float32 logits through the same quantised layers: only the adapter's float32 rounding differs
NF4 = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "float32",
}
# the random base's head predicts near-uniformly; adapting it (unquantised: transformers keeps lm_head in float)
# lets a few steps lower the loss clearly, as in examples/finetune/adapter.yaml
LORA = {
    "peft_type": "LORA",
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "v_proj", "up_proj", "lm_head"],
}


def mapping(model: object, tmp_path: Path, backend: str = "torch", **training: object) -> dict[str, Any]:
    """A training file over the example's sorting data: ``training`` steps of 8 sequences, evaluated at the
    start and the end on 40 held-out examples."""
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join((EXAMPLE / "data" / "valid.jsonl").read_text().splitlines(True)[:40]))
    return {
        "model": model,
        "backend": backend,
        "adapter": LORA,
        "data": {
            "train": str(EXAMPLE / "data" / "train.jsonl"),
            "valid": str(valid),
            "format": "prompt_completion",
            "mask_prompt": True,
            "max_seq_length": 64,
        },
        "training": {
            "learning_rate": 1e-2,
            "max_steps": 6,
            "eval_steps": 6,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 40,
            "logging_steps": 1,
            "seed": 0,
            **training,
        },
        "output_dir": str(tmp_path / "run"),
    }


def problems(data: dict[str, Any], overrides: tuple[str, ...] = ()) -> dict[str, str]:
    with pytest.raises(TrainConfigError) as caught:
        load_train_file(data, overrides)  # type: ignore[arg-type]
    return dict(caught.value.problems)


def eval_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if "eval_loss" in r]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # input sizes that are multiples of 64: bitsandbytes' CPU block and MLX's default group
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=64, layers=2, intermediate=128, seed=0)


# -- the training file ---------------------------------------------------------------------------------------
def test_model_is_a_path_or_a_section_with_quantization(tmp_path: Path) -> None:
    plain = load_train_file(mapping("m", tmp_path))
    assert plain.model == plain.model_path == "m" and plain.quantization is None
    config = load_train_file(mapping({"path": "m", "quantization": NF4}, tmp_path))
    assert config.model_path == "m"
    assert config.quantization == QuantizationConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype="float32",
    )
    on_mlx = load_train_file(mapping({"path": "m", "quantization": {"bits": 4}}, tmp_path, backend="mlx"))
    assert on_mlx.quantization == QuantizationConfig(bits=4)
    # a whole float (YAML's 4.0, --set's 4.0) is the enum's integer, as JSON Schema reads it
    as_float = mapping(
        {"path": "m", "quantization": {"bits": 4.0, "group_size": 32.0}}, tmp_path, backend="mlx"
    )
    assert load_train_file(as_float).quantization == QuantizationConfig(bits=4, group_size=32)
    with pytest.raises(TrainConfigError, match=r"bits"):
        load_train_file(mapping({"path": "m", "quantization": {"bits": 4.5}}, tmp_path, backend="mlx"))
    # --set reaches inside a model written as a plain path
    set_ = load_train_file(mapping("m", tmp_path), ("model.quantization.load_in_4bit=true",))
    assert set_.model_path == "m" and set_.quantization == QuantizationConfig(load_in_4bit=True)


@pytest.mark.parametrize(
    ("model", "backend", "expected"),
    [
        ({"path": "m", "quantisation": {}}, "torch", {"$.model.quantisation": "did you mean 'quantization'"}),
        (
            {"path": "m", "quantization": {"load_in_4bits": True}},
            "torch",
            {"$.model.quantization.load_in_4bits": "did you mean 'load_in_4bit'"},
        ),
        ({"quantization": NF4}, "torch", {"$.model.path": "is required"}),
        (
            {"path": "m", "quantization": {**NF4, "bnb_4bit_quant_type": "nf8"}},
            "torch",
            {"$.model.quantization.bnb_4bit_quant_type": "nf4"},
        ),
        (
            {"path": "m", "quantization": {"bits": 4, "group_size": 48}},
            "mlx",
            {"$.model.quantization.group_size": "64"},
        ),
        (
            {"path": "m", "quantization": {"load_in_4bit": True, "load_in_8bit": True}},
            "torch",
            {"$.model.quantization.load_in_8bit": "contradicts load_in_4bit"},
        ),
        (
            {"path": "m", "quantization": {"load_in_8bit": True, "bnb_4bit_quant_type": "nf4"}},
            "torch",
            {"$.model.quantization.bnb_4bit_quant_type": "only with load_in_4bit"},
        ),
        (
            {"path": "m", "quantization": {"bnb_4bit_use_double_quant": False}},
            "torch",
            {"$.model.quantization.bnb_4bit_use_double_quant": "only with load_in_4bit"},
        ),
        (
            {"path": "m", "quantization": {"load_in_4bit": True, "bits": 4}},
            "torch",
            {"$.model.quantization.bits": "MLX setting"},
        ),
        (
            {"path": "m", "quantization": NF4},
            "mlx",
            {f"$.model.quantization.{k}": "bitsandbytes setting" for k in NF4},
        ),
        ({"path": "m", "quantization": {}}, "torch", {"$.model.quantization": "names no quantisation"}),
        (
            {"path": "m", "quantization": {"load_in_4bit": False}},
            "mlx",
            {"$.model.quantization": "names no quantisation"},
        ),
    ],
)
def test_bad_quantization_is_refused_naming_the_field(
    tmp_path: Path, model: object, backend: str, expected: dict[str, str]
) -> None:
    found = problems(mapping(model, tmp_path, backend=backend))
    assert set(found) == set(expected), found
    for where, words in expected.items():
        assert words in found[where], found


def test_quantised_folders_are_checked_before_the_run(folder: Path, tmp_path: Path) -> None:
    """A folder quantised already (written by ``peftdecl quantize``'s NumPy writer) loads as it is: a second
    ``model.quantization`` is refused, so is the other backend's layout and a folder missing quantisation state."""
    from peftdecl.quant.folder_write import quantize_folder

    nf4 = quantize_folder(folder, tmp_path / "nf4", bits=4, kind="nf4").out
    affine = quantize_folder(folder, tmp_path / "affine", bits=4, kind="affine").out
    check_paths(load_train_file(mapping(str(nf4), tmp_path)))  # as it is: no problem
    check_paths(load_train_file(mapping(str(affine), tmp_path, backend="mlx")))
    cases = [
        (
            {"path": str(nf4), "quantization": NF4},
            "torch",
            r"\$\.model\.quantization: .* is quantised already \(bnb_4bit",
        ),
        (
            {"path": str(affine), "quantization": {"bits": 4}},
            "mlx",
            r"\$\.model\.quantization: .* quantised already",
        ),
        (str(affine), "torch", r"\$\.model: .* holds a mlx_affine checkpoint.*use backend: mlx"),
        ({"path": str(nf4)}, "mlx", r"\$\.model\.path: .* holds a bnb_4bit checkpoint.*use backend: torch"),
        (
            {"path": str(tmp_path / "absent"), "quantization": NF4},
            "torch",
            r"\$\.model\.path: model folder not found",
        ),
    ]
    for model, backend, message in cases:
        with pytest.raises(TrainConfigError, match=message):
            check_paths(load_train_file(mapping(model, tmp_path, backend=backend)))
    # quantisation state missing from the weights file: the key is named
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(nf4 / "model.safetensors"))
    del weights["model.layers.0.self_attn.q_proj.weight.absmax"]
    save_file(weights, str(nf4 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TrainConfigError, match=r"\$\.model: .*q_proj\.weight\.absmax"):
        check_paths(load_train_file(mapping(str(nf4), tmp_path)))


def test_the_qlora_example_validates(capsys: pytest.CaptureFixture[str]) -> None:
    config = load_train_file(EXAMPLE / "qlora.yaml")
    assert config.quantization == QuantizationConfig(**NF4)  # type: ignore[arg-type]
    assert config.backend == "torch" and config.training.gradient_checkpointing
    plain = load_train_file(EXAMPLE / "train.yaml")
    assert (
        config.adapter == plain.adapter and config.data == plain.data
    )  # the same task, only the base differs
    assert main(["validate", str(EXAMPLE / "qlora.yaml")]) == 0
    assert "ok (training file, LORA)" in capsys.readouterr().out


# -- torch: bitsandbytes ---------------------------------------------------------------------------------------
def needs_torch() -> Any:
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")
    for name in ("transformers", "peft", "bitsandbytes"):
        pytest.importorskip(name)
    return pytest.importorskip("torch")


def transformers_quantized(folder: Path, quantization: dict[str, Any]) -> Any:
    """The folder as transformers loads it with the same ``BitsAndBytesConfig`` (CPU repacking off, as ours)."""
    torch = pytest.importorskip("torch")
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    names = {k: getattr(torch, v) if k == "bnb_4bit_compute_dtype" else v for k, v in quantization.items()}
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(**names), device_map="cpu", dtype=torch.float32
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def assert_adapter_equals_peft(folder: Path, adapter: Path, quantization: dict[str, Any]) -> None:
    """Logits through ``adapter``: PEFT over transformers' quantised model vs peftdecl over ours (≤ TOL)."""
    torch = needs_torch()
    import bitsandbytes as bnb
    from peft import PeftModel

    import peftdecl
    from peftdecl_torch.model_io import load_pretrained

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    theirs = PeftModel.from_pretrained(transformers_quantized(folder, quantization), adapter).eval()
    base, _ = load_pretrained(
        folder, device="cpu", dtype="float32", quantization=QuantizationConfig(**quantization)
    )
    layer = base.get_submodule("model.layers.1.self_attn.q_proj")
    peer = theirs.base_model.model.get_submodule("model.layers.1.self_attn.q_proj").base_layer
    assert type(layer) is type(peer) and isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert torch.equal(layer.weight.data, peer.weight.data)  # the same codes: the same quantisation
    ours = peftdecl.load_adapter(base, adapter)
    ours.eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    assert rel_err(got.numpy(), expected.numpy()) <= TOL


def test_qlora_4bit_with_checkpointing_trains_and_its_adapter_equals_peft(
    folder: Path, tmp_path: Path
) -> None:
    needs_torch()
    from peftdecl.train.loop import train

    config = load_train_file(
        mapping({"path": str(folder), "quantization": NF4}, tmp_path, gradient_checkpointing=True)
    )
    train(config)
    before, after = eval_losses(tmp_path / "run")
    assert after < before - 0.1, (before, after)
    assert_adapter_equals_peft(folder, tmp_path / "run" / "adapter", NF4)


def test_8bit_run_trains_and_its_adapter_equals_peft(folder: Path, tmp_path: Path) -> None:
    needs_torch()
    from peftdecl.train.loop import train

    train(load_train_file(mapping({"path": str(folder), "quantization": {"load_in_8bit": True}}, tmp_path)))
    before, after = eval_losses(tmp_path / "run")
    assert after < before - 0.1, (before, after)
    assert_adapter_equals_peft(folder, tmp_path / "run" / "adapter", {"load_in_8bit": True})


def test_a_4bit_run_resumes_as_if_uninterrupted(folder: Path, tmp_path: Path) -> None:
    """Resuming reloads the base quantised from the file's ``model`` section: the losses after the resume equal
    the uninterrupted run's (≤ 1e-6, the torch CPU resume tolerance of docs/fine-tuning.md)."""
    needs_torch()
    import shutil

    from peftdecl.train.loop import train

    def run(where: Path, resume: bool) -> dict[int, float]:
        where.mkdir(exist_ok=True)
        file = mapping({"path": str(folder), "quantization": NF4}, where, max_steps=4, save_steps=2)
        train(load_train_file(file), resume=resume)  # type: ignore[arg-type]
        records = [json.loads(line) for line in (where / "run" / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    straight = run(tmp_path / "a", resume=False)
    (tmp_path / "b" / "run").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "run" / "checkpoint-2", tmp_path / "b" / "run" / "checkpoint-2")
    resumed = run(tmp_path / "b", resume=True)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - straight[step]) <= 1e-6 * abs(straight[step]), step


def test_checkpointing_over_4bit_gives_the_plain_gradients(folder: Path, tmp_path: Path) -> None:
    """One micro-batch's adapter gradients with activation checkpointing equal those without (torch autograd
    through the same Linear4bit layers; ≤ 1e-6: the recomputed forward is the same float32 arithmetic)."""
    torch = needs_torch()
    from peftdecl.train.runtime import MicroBatch
    from peftdecl.train.setup import prepare

    grads = {}
    for checkpointing in (False, True):
        file = mapping(
            {"path": str(folder), "quantization": NF4}, tmp_path, gradient_checkpointing=checkpointing
        )
        run = prepare(load_train_file(file))
        base = run.model.base_model
        flag = (
            "is_activation_checkpointing"
            if hasattr(base, "is_activation_checkpointing")
            else "is_gradient_checkpointing"
        )
        assert bool(getattr(base, flag)) is checkpointing
        ids = [e.tokens for e in run.train.examples[:4]]
        width = max(len(t) for t in ids)
        batch = MicroBatch(
            np.array([np.pad(t, (0, width - len(t))) for t in ids], dtype=np.int32),
            np.array([len(t) for t in ids], dtype=np.int32),
            np.zeros(len(ids), dtype=np.int32),
        )
        run.runtime.forward_backward(batch, 1.0, 1.0)
        grads[checkpointing] = {
            n: p.grad.detach().clone() for n, p in base.named_parameters() if p.grad is not None
        }
        run.runtime.close()
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, rtol=1e-6, atol=1e-9), name


def test_a_saved_4bit_folder_loads_as_it_is(folder: Path, tmp_path: Path) -> None:
    torch = needs_torch()
    import bitsandbytes as bnb

    from peftdecl_torch.model_io import load_pretrained

    saved = tmp_path / "nf4"
    transformers_quantized(folder, NF4).save_pretrained(saved)
    (saved / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    for extra in folder.glob("tokenizer*"):
        (saved / extra.name).write_bytes(extra.read_bytes())
    model, _ = load_pretrained(saved, device="cpu", dtype="float32")
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), bnb.nn.Linear4bit)
    ids = torch.arange(1, 10)[None]
    with torch.no_grad():
        expected = transformers_quantized(folder, NF4).eval()(input_ids=ids).logits
        assert rel_err(model(input_ids=ids).logits.numpy(), expected.numpy()) <= TOL
    with pytest.raises(PeftdeclError, match="quantised already"):
        load_pretrained(
            saved, device="cpu", dtype="float32", quantization=QuantizationConfig(load_in_8bit=True)
        )


def test_merge_writes_a_4bit_folder_requantised_or_dequantised(folder: Path, tmp_path: Path) -> None:
    """``peftdecl merge`` over a 4-bit base: by default the merged layers are re-quantised to exactly PEFT's
    merged codes and transformers loads the folder as 4-bit; with ``--dequantize`` the folder is a float
    checkpoint whose logits equal the unmerged adapter over the 4-bit model (≤ TOL: the CPU 4-bit kernel's
    rounding against a float matmul on the same dequantised weight)."""
    torch = needs_torch()
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import peftdecl
    from peftdecl_torch.model_io import load_pretrained

    base, _ = load_pretrained(folder, device="cpu", dtype="float32", quantization=QuantizationConfig(**NF4))
    spec = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    adapted = peftdecl.attach(base, spec)
    adapted.save_pretrained(tmp_path / "adapter")
    adapted.eval()
    ids = torch.arange(1, 10)[None]
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits.numpy()
    q = "model.layers.1.self_attn.q_proj"
    saved = _saved_nf4(folder, tmp_path / "q4")  # the 4-bit base as transformers saves it
    for out, extra in (("requantised", []), ("float", ["--dequantize"])):
        argv = [
            "merge",
            "--model",
            str(saved),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / out),
        ]
        assert main([*argv, *extra]) == 0
    merged_q = AutoModelForCausalLM.from_pretrained(tmp_path / "requantised", device_map="cpu")
    peer = get_peft_model(
        transformers_quantized(folder, NF4), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    peer.load_adapter(str(tmp_path / "adapter"), adapter_name="default")
    peer_merged = peer.merge_and_unload()
    layer = merged_q.get_submodule(q)
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert torch.equal(layer.weight.data, peer_merged.get_submodule(q).weight.data)  # PEFT's merged codes
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    assert "quantization_config" not in config
    merged_f = AutoModelForCausalLM.from_pretrained(tmp_path / "float", device_map="cpu", dtype=torch.float32)
    assert type(merged_f.get_submodule(q)) is torch.nn.Linear
    with torch.no_grad():
        assert rel_err(merged_f(input_ids=ids).logits.numpy(), expected) <= TOL


def _saved_nf4(folder: Path, saved: Path) -> Path:
    """``folder`` saved by transformers after loading it 4-bit (nf4, double quant), with its tokenizer files."""
    if not (saved / "config.json").exists():
        transformers_quantized(folder, NF4).save_pretrained(saved)
        for extra in folder.glob("tokenizer*"):
            (saved / extra.name).write_bytes(extra.read_bytes())
    return saved


# -- MLX: affine --------------------------------------------------------------------------------------------------
def test_mlx_qlora_trains_and_its_adapter_equals_mlx_lm(folder: Path, tmp_path: Path) -> None:
    if "mlx" not in selected_backends():
        pytest.skip("the mlx backend is not selected")
    mx = pytest.importorskip("mlx.core")
    nn = pytest.importorskip("mlx.nn")
    from mlx_lm import convert, load

    import peftdecl
    from peftdecl.train.loop import train
    from peftdecl_mlx.model_io import load_pretrained

    quantization = {"bits": 4, "group_size": 64}
    file = mapping(
        {"path": str(folder), "quantization": quantization},
        tmp_path,
        backend="mlx",
        max_steps=4,
        learning_rate=2e-2,
        gradient_checkpointing=True,
    )
    # the blocks' layers only: MLX quantises lm_head too, and an HF adapter file over it carries its base weight
    # (as PEFT saves a targeted head), which peftdecl's loader writes back into the QuantizedLinear re-quantised,
    # changing its codes; mlx-lm's format carries no base weight
    file["adapter"] = {**LORA, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}
    train(load_train_file({**file, "save_formats": ["hf", "mlx-lm"]}))
    before, after = eval_losses(tmp_path / "run")
    assert after < before - 0.1, (before, after)

    converted = tmp_path / "mlx-q4"
    convert(str(folder), mlx_path=str(converted), quantize=True, q_bits=4, q_group_size=64, dtype="float32")
    theirs, _ = load(str(converted), adapter_path=str(tmp_path / "run" / "adapter-mlx-lm"))
    base, _ = load_pretrained(
        folder, device="auto", dtype="float32", quantization=QuantizationConfig(**quantization)
    )
    layer = base.model.layers[1].self_attn.q_proj
    peer = dict(theirs.model.layers[1].self_attn.q_proj.named_modules())[""]
    peer = getattr(peer, "linear", peer)
    assert isinstance(layer, nn.QuantizedLinear) and isinstance(peer, nn.QuantizedLinear)
    for key in ("weight", "scales", "biases"):  # the same codes as mlx_lm.convert -q
        assert mx.array_equal(getattr(layer, key), getattr(peer, key)).item(), key
    ours = peftdecl.load_adapter(base, tmp_path / "run" / "adapter")
    ours.eval()
    theirs.eval()
    ids = mx.array([[1, 5, 9, 13, 17, 21, 25, 29, 33]])
    expected = theirs(ids)
    got = ours(ids)
    assert rel_err(np.array(got), np.array(expected)) <= TOL
    # and the converted folder itself loads quantised, as it is
    again, _ = load_pretrained(converted, device="auto", dtype="float32")
    assert isinstance(again.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    with pytest.raises(PeftdeclError, match="quantised already"):
        load_pretrained(converted, device="auto", dtype="float32", quantization=QuantizationConfig(bits=4))


def test_a_quantised_load_without_bitsandbytes_says_which_extra(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_torch()
    import importlib.util

    from peftdecl_torch.model_io import load_pretrained

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(PeftdeclError, match=r"needs bitsandbytes.*peftdecl\[qlora\]"):
        load_pretrained(folder, device="cpu", dtype="float32", quantization=QuantizationConfig(**NF4))
