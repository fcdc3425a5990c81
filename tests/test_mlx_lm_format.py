"""mlx-lm adapter files both ways, against mlx-lm's own code: its loader (tuner.utils.load_adapters, which builds
LoRALinear / DoRALinear / LoRAEmbedding), its training entry point (lora.train_model, which saves with its own
code), and conversion to and from HF PEFT files checked with the real PEFT.

Tolerances: the same float32 MLX model computed by mlx-lm's layers and by peftdecl's: logits relative error ≤ 1e-5;
across frameworks (MLX vs torch): ≤ 1e-4.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

import peftdecl
from peftdecl.cli import main
from peftdecl.errors import AdapterFileError
from tests.conftest import rel_err
from tests.mlx_models import mx, tiny_llama

SAME_TOL = 1e-5
CROSS_TOL = 1e-4
IDS = mx.array([[3, 17, 42, 9, 60, 5], [33, 1, 8, 12, 23, 23]])

SPECS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": dict(r=4, lora_alpha=6, use_dora=True, target_modules=["q_proj", "down_proj"]),
    "some_layers": dict(r=2, lora_alpha=2, target_modules=["o_proj"], layers_to_transform=[0]),
    "last_layer_rslora": dict(
        r=4, lora_alpha=4, use_rslora=True, target_modules=["gate_proj"], layers_to_transform=[1]
    ),
    "embedding_and_head": dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "k_proj"]),
}


def fresh():
    return tiny_llama(seed=0)


def logits(model) -> np.ndarray:
    out = model(IDS)
    mx.eval(out)
    return np.array(out)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_written_file_loads_in_mlx_lm_with_the_same_logits(case: str, tmp_path) -> None:
    from mlx_lm.tuner.utils import load_adapters

    ours = peftdecl.attach(fresh(), {"peft_type": "LORA", "init_lora_weights": False, **SPECS[case]}, seed=2)
    ours.eval()
    ours.save(tmp_path, format="mlx-lm")
    theirs = load_adapters(fresh(), str(tmp_path)).eval()
    layer_types = {type(m).__name__ for _, m in theirs.named_modules()}
    assert ("DoRALinear" if case == "dora" else "LoRALinear") in layer_types
    assert rel_err(logits(theirs), logits(ours)) <= SAME_TOL
    back = peftdecl.load_adapter(fresh(), tmp_path)
    assert set(back.plan().targets) == set(ours.plan().targets)
    assert rel_err(logits(back.eval()), logits(ours)) <= SAME_TOL


def test_block_relative_keys_when_the_targets_are_the_last_blocks(tmp_path) -> None:
    ours = peftdecl.attach(fresh(), {"peft_type": "LORA", **SPECS["last_layer_rslora"]})
    ours.save(tmp_path, format="mlx-lm")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["num_layers"] == 1 and config["lora_parameters"]["keys"] == ["mlp.gate_proj"]
    assert config["lora_parameters"]["scale"] == pytest.approx(4 / 2)  # alpha / sqrt(r)


class TokenData(list):
    """The dataset interface mlx-lm's trainer reads: items are token lists, ``process`` adds the offset."""

    def process(self, item):
        return item, 0


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_adapter_trained_by_mlx_lm_gives_the_same_logits_in_peftdecl(fine_tune_type: str, tmp_path) -> None:
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.utils import load_adapters

    rng = np.random.default_rng(0)
    data = TokenData(rng.integers(0, 64, size=7).tolist() for _ in range(4))
    args = types.SimpleNamespace(
        **{
            **CONFIG_DEFAULTS,
            "fine_tune_type": fine_tune_type,
            "num_layers": 1,
            "batch_size": 2,
            "iters": 2,
            "learning_rate": 1e-2,
            "steps_per_report": 10,
            "save_every": 100,
            "max_seq_length": 8,
            "adapter_path": str(tmp_path),
            "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 10.0,
                                "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
        }
    )  # fmt: skip
    trained = fresh()
    train_model(args, trained, TokenData(data), TokenData([]))
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    assert all(k.startswith("model.layers.1.self_attn.") for k in saved)
    theirs = load_adapters(fresh(), str(tmp_path)).eval()
    assert rel_err(logits(theirs), logits(trained.eval())) <= SAME_TOL
    ours = peftdecl.load_adapter(fresh(), tmp_path).eval()
    assert ours.spec().use_dora == (fine_tune_type == "dora")
    assert set(ours.plan().targets) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert rel_err(logits(ours), logits(theirs)) <= SAME_TOL


@pytest.mark.peft
@pytest.mark.parametrize("case", ["lora", "dora", "some_layers"])
def test_convert_both_ways_against_peft_and_mlx_lm(case: str, tmp_path) -> None:
    from mlx_lm.tuner.utils import load_adapters

    from tests.hf_models import peft, peft_model, perturb, torch, transformers
    from tests.hf_models import tiny_llama as hf_llama

    folder = tmp_path / "ckpt"
    hf_llama().save_pretrained(folder)
    base_t = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    wrapped = peft_model(base_t, peft.LoraConfig(init_lora_weights=False, **SPECS[case]))
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path / "hf")
    ids = np.array(IDS) % 128
    with torch.no_grad():
        expected = wrapped(torch.tensor(ids)).logits.numpy()

    assert (
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "mlx"), "--to", "mlx-lm", "--num-layers", "2"])
        == 0
    )
    from peftdecl_mlx.inventory import load_checkpoint

    theirs = load_adapters(load_checkpoint(folder), str(tmp_path / "mlx"))
    assert rel_err(np.array(theirs(mx.array(ids))), expected) <= CROSS_TOL

    assert main(["convert", str(tmp_path / "mlx"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    reloaded = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(folder), tmp_path / "hf2"
    )
    with torch.no_grad():
        again = reloaded.eval()(torch.tensor(ids)).logits.numpy()
    assert rel_err(again, expected) <= CROSS_TOL
    assert set(peft.utils.load_peft_weights(str(tmp_path / "hf2"))) == set(
        peft.get_peft_model_state_dict(wrapped)
    )


def test_what_mlx_lm_cannot_express_is_listed(tmp_path) -> None:
    spec = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "k_proj"], "rank_pattern": {"k_proj": 2},
            "modules_to_save": ["lm_head"]}  # fmt: skip
    model = peftdecl.attach(fresh(), spec)
    with pytest.raises(AdapterFileError) as err:
        model.save(tmp_path / "x", format="mlx-lm")
    message = str(err.value)
    assert "modules_to_save ['lm_head']" in message
    assert "one rank for every layer" in message and "4: model.layers.0.self_attn.q_proj" in message
    assert "one scale for every layer" in message
    assert not (tmp_path / "x" / "adapters.safetensors").exists()
    ia3 = peftdecl.attach(
        fresh(), {"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": []}
    )
    with pytest.raises(AdapterFileError, match="mlx-lm stores LoRA and DoRA only, not ia3"):
        ia3.save(tmp_path / "y", format="mlx-lm")


def test_mlx_lm_files_peftdecl_refuses(tmp_path) -> None:
    ours = peftdecl.attach(
        fresh(), {"peft_type": "LORA", "target_modules": ["q_proj"], "init_lora_weights": False}
    )
    ours.save(tmp_path, format="mlx-lm")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "full"}))
    with pytest.raises(AdapterFileError, match="'full' stores whole weights"):
        peftdecl.load_adapter(fresh(), tmp_path)
    config["lora_parameters"]["rank"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="do not have the configured rank 3"):
        peftdecl.load_adapter(fresh(), tmp_path)
    tied = tiny_llama(tie_word_embeddings=True)
    emb = peftdecl.attach(
        tied, {"peft_type": "LORA", "target_modules": ["embed_tokens"], "init_lora_weights": False}
    )
    emb.save(tmp_path / "emb", format="mlx-lm")
    with pytest.raises(AdapterFileError, match="tied output head"):
        peftdecl.load_adapter(tiny_llama(tie_word_embeddings=True), tmp_path / "emb")


def test_convert_refuses_dora_on_an_embedding(tmp_path) -> None:
    ours = peftdecl.attach(
        fresh(), {"peft_type": "LORA", "use_dora": True, "target_modules": ["embed_tokens"]}
    )
    with pytest.raises(AdapterFileError, match="DoRA on an embedding"):
        ours.save(tmp_path, format="mlx-lm")
    assert ours.trainable_parameters()  # the model itself is fine
