"""`peftdecl inspect` on every format load_adapter reads: every kind × layer type saved by peftdecl (HF PEFT and
native), folders written by real HF PEFT and by mlx-lm, sub-adapters, and paths that are not adapters.

Expected modules, tensor names, ranks and parameter counts come from the compiled plan of the adapter that was
saved and from the file read back with the `safetensors` package, never from inspect's own parsing."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from peftdecl.cli import main
from peftdecl.inspect import format_summary, summarise, summarise_all
from tests.layer_cases import KINDS, build

CASES = [(kind, layer) for kind, entry in sorted(KINDS.items()) for layer in entry.layers]
WEIGHTS = {
    "hf": "adapter_model.safetensors",
    "native": "adapter.safetensors",
    "mlx-lm": "adapters.safetensors",
}


def _build(kind: str, layer: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OFT/BOFT block adjustments
        return build(kind, layer, **({"feedforward_modules": []} if kind == "ia3" else {}))[0]


def expected_rank(lp) -> str:
    """What the table's rank column must say for one planned layer (from the plan, not from tensor shapes)."""
    if lp.kind == "oft":
        return f"{lp.options['n_blocks']}×{lp.options['block_size']}"
    if lp.kind == "boft":
        return f"{lp.options['n_butterfly_factor']}×{lp.options['block_num']}×{lp.options['block_size']}"
    if lp.kind == "ia3":
        return "-"
    return str(lp.r)


def file_tensors(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.mark.parametrize("file_format", ["hf", "native"])
@pytest.mark.parametrize(("kind", "layer"), CASES)
def test_inspect_every_kind_and_layer(kind: str, layer: str, file_format: str, tmp_path, capsys) -> None:
    model = _build(kind, layer)
    plan = model.plan()
    model.save(tmp_path, format=file_format)
    summary = summarise(tmp_path)
    assert summary.format == file_format
    assert summary.spec.peft_type == plan.spec.peft_type
    planned = {lp.module: lp for lp in plan.layers}
    assert set(summary.modules) == set(planned)
    for module, lp in planned.items():
        assert set(summary.modules[module]) == {p.name for p in lp.params}, module
        for p in lp.params:
            assert summary.modules[module][p.name] == p.shape
    assert set(summary.shared) == {p.name for p in plan.shared}
    saved = file_tensors(tmp_path / WEIGHTS[file_format])
    assert summary.num_parameters == sum(v.size for v in saved.values())
    assert summary.dtypes == ("float32",)

    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for module, lp in planned.items():
        row = next(line for line in out.splitlines() if line.startswith(module + " "))
        assert row.split()[1] == expected_rank(lp), row
    assert f"parameters  {summary.num_parameters:,}" in out


def test_oft_on_an_embedding_is_a_module_row_not_a_shared_tensor(tmp_path) -> None:
    # the old suffix table lacked oft_embedding_R.weight, listing it as "shared emb.oft_embedding_R.weight"
    model = _build("oft", "embedding")
    model.save(tmp_path)
    text = format_summary(summarise(tmp_path))
    assert "shared" not in text
    row = next(line for line in text.splitlines() if line.startswith("m "))
    assert row.split()[1] == expected_rank(model.plan().layers[0])


def test_mlx_lm_and_native_folders_and_sub_adapters(tmp_path, capsys) -> None:
    model = _build("lora", "linear")
    model.add_adapter("second", {"peft_type": "LORA", "r": 2, "target_modules": ["m"]})
    for file_format in ("hf", "mlx-lm", "native"):
        folder = tmp_path / file_format
        model.save(folder, format=file_format)
        summaries = summarise_all(folder)
        assert [s.name for s in summaries] == ["default", "second"]
        assert {s.format for s in summaries} == {file_format}
        assert [s.num_parameters for s in summaries] == [
            sum(v.size for v in model.state_dict(n).values()) for n in ("default", "second")
        ]
        assert main(["inspect", str(folder)]) == 0
        out = capsys.readouterr().out
        assert out.count("adapter     ") == 2 and "adapter     second" in out
        ranks = [line.split()[1] for line in out.splitlines() if line.startswith("m ")]
        assert ranks == ["3", "2"], (file_format, out)


def test_a_folder_saved_by_real_peft(tmp_path, capsys) -> None:
    from tests.hf_models import peft, peft_model, tiny_llama

    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft_model(tiny_llama(), config)
    wrapped.save_pretrained(tmp_path)
    # PEFT cannot mix kinds in one model; a second model's "other" adapter goes to tmp_path/other
    oft = peft.OFTConfig(r=0, oft_block_size=8, target_modules=["embed_tokens"])
    peft_model(tiny_llama(), oft, adapter="other").save_pretrained(tmp_path)
    summaries = summarise_all(tmp_path)
    assert [s.name for s in summaries] == ["default", "other"]
    lora, oft = summaries
    theirs = {n: p for n, p in wrapped.named_parameters() if ".lora_" in n}
    assert set(lora.modules) == {n.split(".lora_")[0].removeprefix("base_model.model.") for n in theirs}
    assert lora.num_parameters == sum(p.numel() for p in theirs.values())
    # hidden 64 in blocks of 8: 8 rows of 8·7/2 skew entries; PEFT also saves the embedding it wrapped
    assert oft.modules == {
        "model.embed_tokens": {
            "base_layer.weight": (128, 64),
            "oft_embedding_R.weight": (64 // 8, 8 * 7 // 2),
        }
    }
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("model.embed_tokens "))
    assert row.split()[1] == "8×8" and "shared" not in out


PEFT_CONFIGS = {
    "dora": ("LoraConfig", {"r": 4, "use_dora": True, "target_modules": ["q_proj", "v_proj"]}, "4"),
    "adalora": ("AdaLoraConfig", {"init_r": 6, "total_step": 10, "target_modules": ["q_proj"]}, "6"),
    "ia3": ("IA3Config", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, "-"),
    "loha": ("LoHaConfig", {"r": 3, "target_modules": ["q_proj"]}, "3"),
    "lokr": ("LoKrConfig", {"r": 4, "target_modules": ["q_proj"], "decompose_both": True}, "4"),
    "oft": ("OFTConfig", {"r": 0, "oft_block_size": 16, "target_modules": ["q_proj"]}, "4×16"),
    "boft": ("BOFTConfig", {"boft_block_size": 8, "target_modules": ["q_proj"]}, "1×8×8"),
    "vera": ("VeraConfig", {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "8"),
    "prompt": ("PromptTuningConfig", {"num_virtual_tokens": 5, "task_type": "CAUSAL_LM"}, None),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_every_kind_saved_by_real_peft(kind: str, tmp_path, capsys) -> None:
    """Modules: the layers PEFT wrapped (its BaseTunerLayer instances); count: the file's tensors; rank: the
    config's (for OFT/BOFT the block layout it implies on the 64-wide projections)."""
    from tests.hf_models import peft, peft_model, tiny_llama

    name, fields, rank = PEFT_CONFIGS[kind]
    wrapped = peft_model(tiny_llama(), getattr(peft, name)(**fields))
    wrapped.save_pretrained(tmp_path)
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped_layers = {
        n.removeprefix("base_model.model.")
        for n, m in wrapped.named_modules()
        if isinstance(m, BaseTunerLayer)
    }
    summary = summarise(tmp_path)
    assert summary.format == "hf" and set(summary.modules) == wrapped_layers
    assert summary.num_parameters == sum(v.size for v in file_tensors(tmp_path / WEIGHTS["hf"]).values())
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    if rank is None:
        assert "shared      prompt_embeddings [5, 64]" in out
    for module in wrapped_layers:
        row = next(line for line in out.splitlines() if line.startswith(module + " "))
        assert row.split()[1] == rank, row


def test_a_folder_written_by_mlx_lm(tmp_path, capsys) -> None:
    pytest.importorskip("mlx_lm", reason="mlx-lm writes this folder (the mlx extra)")
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from tests.mlx_models import mx, tiny_llama, tree_flatten

    model = tiny_llama(seed=0)
    model.freeze()
    params = {"rank": 4, "dropout": 0.0, "scale": 10.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
    linear_to_lora_layers(model, 1, params)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": params}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    summary = summarise(tmp_path)
    assert summary.format == "mlx-lm"
    assert set(summary.modules) == {k.rsplit(".", 1)[0] for k in weights}
    assert summary.num_parameters == sum(v.size for v in weights.values())
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("model.layers.1.self_attn.")]
    assert len(rows) == 2 and all(row.split()[1] == "4" for row in rows)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "no such folder"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "not a folder"),
        (lambda p: p, "not an adapter folder (expected adapter_config.json"),
    ],
)
def test_paths_that_are_not_adapters(make, message, tmp_path, capsys) -> None:
    path = make(tmp_path)
    assert main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and message in lines[0]
