"""An ``mlx_lm.lora`` YAML config read as a training file: each option mapped to its equivalent, or refused.

mlx-lm fills every option the file leaves out from its ``CONFIG_DEFAULTS`` (copied in :data:`MLX_LM_DEFAULTS`;
a test compares the copy with the installed mlx-lm), so a config means the same run here as there: e.g. no
``num_layers`` still trains only the last 16 blocks, no ``lr_schedule`` is a constant learning rate, and no
gradient clipping happens. An option the file sets and peftdecl cannot honour exactly (``fine_tune_type: full``,
``test: true``, a Hugging Face dataset name, an optimizer or schedule peftdecl lacks, ...) is a TrainConfigError
naming the option (JSON path into the mlx-lm file) and why; a value that changes nothing (``test: false``,
``report_to: null``) is accepted, and so is ``val_batches``, which only bounds how much of the validation set
mlx-lm evaluates. ``lr_schedule`` is mapped in :mod:`.mlx_lm_schedule`. The docs' Fine-tuning page lists where
the meanings differ.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from peftdecl._json import JsonObject, JsonValue
from peftdecl.errors import TrainConfigError
from peftdecl.train.mlx_lm_schedule import schedule_options
from peftdecl.train.mlx_lm_schedule import show_option as _show
from peftdecl.train.overrides import EXPONENT_FLOAT

MLX_LM_DEFAULTS: JsonObject = {
    "model": "Qwen/Qwen3-0.6b",
    "train": False,
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "optimizer_config": {"adam": {}, "adamw": {}, "muon": {}, "sgd": {}, "adafactor": {}},
    "data": "mlx-community/WikiSQL",
    "seed": 0,
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "learning_rate": 1e-5,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "save_every": 100,
    "test": False,
    "test_batches": 500,
    "max_seq_length": 2048,
    "config": None,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "clear_cache_threshold": 0,
    "lr_schedule": None,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
    "mask_prompt": False,
    "report_to": None,
    "project_name": None,
    "trust_remote_code": False,
}
"""mlx-lm 0.32's ``mlx_lm.lora.CONFIG_DEFAULTS`` (mlx-lm itself imports MLX, which the core never does)."""

DATASET_KEYS: JsonObject = {
    "text_feature": "text",
    "prompt_feature": "prompt",
    "completion_feature": "completion",
    "chat_feature": "messages",
}
"""mlx-lm's dataset key options and their defaults; peftdecl reads those fixed keys only."""

KNOWN_KEYS = frozenset(MLX_LM_DEFAULTS) | frozenset(DATASET_KEYS) | {"hf_dataset"}
"""Every option an ``mlx_lm.lora`` config can hold."""

TRAIN_FILE_ONLY_KEYS = frozenset(
    {"adapter", "training", "output_dir", "save_formats", "generation_check", "backend", "device", "dtype"}
)

# mlx.optimizers' defaults for the options each optimizer takes (betas, eps, weight decay of AdamW 0.01)
_ADAM_OPTIONS = {"betas": [0.9, 0.999], "eps": 1e-8, "bias_correction": False}
_OPTIMIZER_OPTIONS: dict[str, JsonObject] = {
    "adam": _ADAM_OPTIONS,
    "adamw": {**_ADAM_OPTIONS, "weight_decay": 0.01},
    "sgd": {"momentum": 0.0, "weight_decay": 0.0, "dampening": 0.0, "nesterov": False},
}


def is_mlx_lm_config(data: object) -> bool:
    """True for a mapping that is an ``mlx_lm.lora`` config: ``data`` (if any) is a folder name, not a mapping, no
    key is a training-file-only one (``adapter``, ``training``, ``output_dir``, ...), and some key is mlx-lm's."""
    if not isinstance(data, Mapping) or isinstance(data.get("data"), Mapping):
        return False
    keys = set(data)
    return not keys & TRAIN_FILE_ONLY_KEYS and bool(keys & (KNOWN_KEYS - {"model"}))


def from_mlx_lm(
    data: Mapping[str, JsonValue],
    model_config: Mapping[str, JsonValue] | None,
    block_linears: Sequence[str] | None = None,
) -> JsonObject:
    """The training-file dict equivalent to the ``mlx_lm.lora`` config ``data``.

    ``model_config`` is the model folder's ``config.json`` (``num_hidden_layers`` turns ``num_layers`` into
    ``layers_to_transform``: the last ``num_layers`` blocks). ``block_linears`` are the block-relative names of
    the blocks' linear layers (``self_attn.q_proj``, ...), needed only when the config names no ``keys`` and
    adapts only some blocks (HF PEFT takes ``all-linear`` only for every block). Raises TrainConfigError listing
    every option that has no exact equivalent, with its JSON path in ``data``.
    """
    mapper = _Mapper(data, model_config, block_linears)
    out = mapper.run()
    if mapper.problems:
        raise TrainConfigError(mapper.problems)
    return out


class _Mapper:
    """One mapping run: the given options, mlx-lm's defaults for the rest, and the problems found."""

    def __init__(
        self,
        given: Mapping[str, JsonValue],
        model_config: Mapping[str, JsonValue] | None,
        block_linears: Sequence[str] | None,
    ) -> None:
        self.given = given
        self.options: JsonObject = {**MLX_LM_DEFAULTS, **given}
        self.model_config = model_config or {}
        self.block_linears = block_linears
        self.problems: list[tuple[str, str]] = []

    def refuse(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def run(self) -> JsonObject:
        for key in self.given:
            if key not in KNOWN_KEYS:
                close = difflib.get_close_matches(str(key)[:100], sorted(KNOWN_KEYS), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.refuse(f"$.{key}", f"not an mlx_lm.lora option{hint}")
        self._check_no_ops()
        accumulation = self.integer("grad_accumulation_steps", 1)
        training: JsonObject = {
            "per_device_train_batch_size": self.integer("batch_size", 1),
            "per_device_eval_batch_size": self.integer("batch_size", 1),
            "gradient_accumulation_steps": accumulation,
            "max_steps": self._steps("iters", accumulation),
            "logging_steps": self._steps("steps_per_report", accumulation),
            "save_steps": self._steps("save_every", accumulation),
            "seed": self.integer("seed", 0),
            "gradient_checkpointing": self.boolean("grad_checkpoint"),
            "max_grad_norm": 0.0,  # mlx-lm does not clip gradients
            **self._optimizer(),
        }
        schedule, rate = self.value("lr_schedule"), self.value("learning_rate")
        training.update(schedule_options(schedule, rate, training["max_steps"], self))
        data = self._data()
        if "valid" in data:  # as in mlx-lm, no validation set: no evaluation
            training["eval_steps"] = self._steps("steps_per_eval", accumulation)
        return {
            "model": self._model(),
            "adapter": self._adapter(),
            "data": data,
            "training": {k: v for k, v in training.items() if v is not None},
            "output_dir": self.string("adapter_path"),
            "save_formats": ["hf", "mlx-lm"],
        }

    # typed reads of one option (the given value or mlx-lm's default); a problem names the option's path

    def value(self, key: str) -> JsonValue:
        return self.options.get(key)

    def integer(self, key: str, minimum: int, value: JsonValue = None, path: str = "") -> int | None:
        value = self.value(key) if value is None else value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        self.refuse(path or f"$.{key}", f"expected an integer >= {minimum}, got {_show(value)}")
        return None

    def number(self, path: str, value: JsonValue) -> float | None:
        if isinstance(value, str) and EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)  # mlx-lm's YAML loader reads 1e-5 (no dot) as a float; PyYAML does not
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        self.refuse(path, f"expected a finite number, got {_show(value)}")
        return None

    def boolean(self, key: str) -> bool | None:
        value = self.value(key)
        if isinstance(value, bool):
            return value
        self.refuse(f"$.{key}", f"expected true or false, got {_show(value)}")
        return None

    def string(self, key: str) -> str | None:
        value = self.value(key)
        if isinstance(value, str) and value:
            return value
        self.refuse(f"$.{key}", f"expected a non-empty string, got {_show(value)}")
        return None

    def _steps(self, key: str, accumulation: int | None) -> int | None:
        """mlx-lm counts iterations (micro-batches); the training file counts optimizer steps."""
        iterations = self.integer(key, 1)
        if iterations is None or accumulation is None:
            return None
        if key == "iters" and iterations < accumulation:
            self.refuse("$.iters", f"{iterations} iterations make no step of {accumulation} micro-batches")
        elif key != "iters" and iterations % accumulation:
            self.refuse(
                f"$.{key}", f"{iterations} is not a whole number of steps of {accumulation} micro-batches"
            )
        else:
            return iterations // accumulation  # mlx-lm never applies a trailing partial accumulation
        return None

    def _check_no_ops(self) -> None:
        """Options accepted only at a value that changes nothing here; any other value is refused."""
        rules: list[tuple[str, tuple[JsonValue, ...], str]] = [
            ("train", (True,), "peftdecl train always trains; false would make mlx-lm only test"),
            ("test", (False,), "peftdecl train does not evaluate a test split; run it separately"),
            ("resume_adapter_file", (None,), "resume with `peftdecl train FILE --resume [CHECKPOINT_DIR]`"),
            (
                "report_to",
                (None, ""),
                "peftdecl writes output_dir/log.jsonl and loss.png, no tracking service",
            ),
            ("trust_remote_code", (False,), "peftdecl never runs code from a model folder"),
            ("config", (None,), "a config file inside a config file is not read"),
            ("hf_dataset", (None,), "peftdecl reads local JSON Lines files only"),
        ]
        for key, accepted, why in rules:
            if key in self.given and not any(_same(self.given[key], ok) for ok in accepted):
                allowed = " or ".join(_show(ok) for ok in accepted)
                message = f"{_show(self.given[key])} has no equivalent ({why}); only {allowed} is accepted"
                self.refuse(f"$.{key}", message)
        for key, default in DATASET_KEYS.items():
            if key in self.given and self.given[key] != default:
                self.refuse(f"$.{key}", f"peftdecl reads the fixed key {default!r} of each example")
        # accepted at any value: project_name and test_batches only matter with report_to / test (refused above
        # unless no-ops); clear_cache_threshold is a memory knob of mlx-lm's loop that changes no number;
        # val_batches bounds mlx-lm's eval to that many random full batches, where peftdecl evaluates all of
        # data.valid: only the reported eval loss can differ (the Fine-tuning page says so)

    def _model(self) -> str | None:
        if "model" in self.given:
            return self.string("model")
        default = MLX_LM_DEFAULTS["model"]
        self.refuse("$.model", f"is required: mlx-lm's default {default!r} is not a local model folder")
        return None

    def _data(self) -> JsonObject:
        folder = self.value("data")
        out: JsonObject = {"format": "auto", "mask_prompt": self.boolean("mask_prompt")}
        out["max_seq_length"] = self.integer("max_seq_length", 2)
        out = {k: v for k, v in out.items() if v is not None}
        if not isinstance(folder, str) or not folder:
            self.refuse("$.data", f"expected a folder name, got {_show(folder)}")
            return {**out, "train": "train.jsonl"}
        if not _is_dir(Path(folder)):
            default = "" if "data" in self.given else " (mlx-lm's default, as the file sets no data)"
            why = (
                "a Hugging Face dataset name is not read; peftdecl reads train.jsonl and valid.jsonl from one"
            )
            self.refuse("$.data", f"{folder!r}{default} is not a local folder: {why}")
        out["train"] = str(Path(folder) / "train.jsonl")
        if (Path(folder) / "valid.jsonl").is_file():
            out["valid"] = str(Path(folder) / "valid.jsonl")
        return out

    def _adapter(self) -> JsonObject:
        kind = self.value("fine_tune_type")
        spec: JsonObject = {"peft_type": "LORA"}
        if kind not in ("lora", "dora"):
            why = "peftdecl trains adapters, not full weights" if kind == "full" else "expected lora or dora"
            self.refuse("$.fine_tune_type", f"{_show(kind)} has no equivalent: {why}")
        params = self.value("lora_parameters")
        if not isinstance(params, Mapping):
            self.refuse("$.lora_parameters", f"expected a mapping, got {_show(params)}")
            return spec
        for key in params:
            if key not in ("rank", "scale", "dropout", "keys"):
                self.refuse(
                    f"$.lora_parameters.{key}", "not an mlx-lm LoRA option (rank, scale, dropout, keys)"
                )
        missing = [key for key in ("rank", "scale", "dropout") if key not in params]
        for key in missing:  # mlx-lm reads all three, with no default once lora_parameters is given
            self.refuse(f"$.lora_parameters.{key}", "is required (mlx-lm has no default for it here)")
        if missing:
            return spec
        rank = self.integer("", 1, params["rank"], "$.lora_parameters.rank")
        scale = self.number("$.lora_parameters.scale", params["scale"])
        spec["lora_dropout"] = self.number("$.lora_parameters.dropout", params["dropout"])
        if rank is not None and scale is not None:  # mlx-lm adds scale·BAx; PEFT adds (lora_alpha / r)·BAx
            alpha = scale * rank
            spec.update(r=rank, lora_alpha=int(alpha) if alpha.is_integer() else alpha)
        keys = params.get("keys")
        layers = self._layers()
        if keys is None and layers is None:
            spec["target_modules"] = "all-linear"  # mlx-lm's default: every linear layer of every block
        elif keys is None and self.block_linears:
            spec["target_modules"] = sorted(set(self.block_linears))  # ... of the chosen blocks, by name
        elif keys is None:
            why = "mlx-lm's default, every linear layer of those blocks, is not listable from the model's weights"
            self.refuse("$.lora_parameters.keys", f"needed to adapt only some blocks: {why}")
        elif isinstance(keys, list) and keys and all(isinstance(k, str) and k for k in keys):
            spec["target_modules"] = list(keys)  # block-relative names match as PEFT suffixes
        else:
            self.refuse("$.lora_parameters.keys", f"expected a list of module names, got {_show(keys)}")
        if kind == "dora":
            spec["use_dora"] = True
        if layers is not None:
            spec["layers_to_transform"] = layers
        return {k: v for k, v in spec.items() if v is not None}

    def _layers(self) -> list[int] | None:
        """mlx-lm adapts ``model.layers[-max(num_layers, 0):]``: the last num_layers blocks; -1 and 0 mean all."""
        count = self.integer("num_layers", -1)
        if count is None or count <= 0:
            return None
        total = self.model_config.get("num_hidden_layers")
        default = "" if "num_layers" in self.given else f" (mlx-lm's default {count}, as the file sets none)"
        if not isinstance(total, int) or isinstance(total, bool) or total < 1:
            why = "needs num_hidden_layers from the model folder's config.json, which is not readable"
            self.refuse("$.num_layers", f"{count}{default} {why} (use -1 for every block)")
        elif count > total:
            self.refuse("$.num_layers", f"{count}{default} blocks requested, but the model has {total}")
        else:
            return None if count == total else list(range(total - count, total))
        return None

    def _optimizer(self) -> JsonObject:
        name = self.value("optimizer")
        configs = self.value("optimizer_config")
        if name not in _OPTIMIZER_OPTIONS:
            self.refuse("$.optimizer", f"{_show(name)} has no equivalent; peftdecl has adam, adamw and sgd")
            return {}
        given = configs.get(name) or {} if isinstance(configs, Mapping) else None
        path = f"$.optimizer_config.{name}"
        if not isinstance(given, Mapping):
            self.refuse(path, f"expected a mapping of {name}'s options, got {_show(given)}")
            return {}
        allowed = _OPTIMIZER_OPTIONS[name]
        for key in given:
            if key not in allowed:
                self.refuse(
                    f"{path}.{key}", f"not an option of mlx's {name} honoured here ({', '.join(allowed)})"
                )
        options = {**allowed, **given}
        if name == "sgd":
            for key, none in (("momentum", 0.0), ("nesterov", False)):
                if not _same(options[key], none):
                    self.refuse(f"{path}.{key}", f"{_show(options[key])}: peftdecl's sgd has no momentum")
            return {
                "optim": "sgd",
                "weight_decay": self.number(f"{path}.weight_decay", options["weight_decay"]),
            }
        if not isinstance(options["bias_correction"], bool):
            self.refuse(
                f"{path}.bias_correction", f"expected a boolean, got {_show(options['bias_correction'])}"
            )
        betas = options["betas"]
        if not (isinstance(betas, list) and len(betas) == 2):
            self.refuse(f"{path}.betas", f"expected [beta1, beta2], got {_show(betas)}")
            return {"optim": "adamw"}
        return {
            "optim": "adamw",
            "adam_beta1": self.number(f"{path}.betas[0]", betas[0]),
            "adam_beta2": self.number(f"{path}.betas[1]", betas[1]),
            "adam_epsilon": self.number(f"{path}.eps", options["eps"]),
            "weight_decay": self.number(f"{path}.weight_decay", options.get("weight_decay", 0.0)),
        }


def _same(value: JsonValue, accepted: JsonValue) -> bool:
    """Equal and of the same kind (``0`` is not ``false``)."""
    return isinstance(value, bool) == isinstance(accepted, bool) and value == accepted


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False
