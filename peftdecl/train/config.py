"""The training file: msgspec Structs whose JSON Schema is published as ``schemas/train.schema.json``.

Field names under ``training`` are transformers ``TrainingArguments`` names; under ``data`` they follow mlx-lm;
under ``model.quantization`` they are transformers ``BitsAndBytesConfig``'s (torch) and mlx-lm's (MLX).
Reading, validating and checking a file is :mod:`peftdecl.train.load`'s job.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

PositiveInt = Annotated[int, Meta(ge=1, le=2**31 - 1)]
NonNegativeInt = Annotated[int, Meta(ge=0, le=2**31 - 1)]
PositiveFloat = Annotated[float, Meta(gt=0.0, le=1.0e6)]
NonNegativeFloat = Annotated[float, Meta(ge=0.0, le=1.0e6)]
Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
OpenFraction = Annotated[float, Meta(ge=0.0, lt=1.0)]

DataFormat = Literal["auto", "text", "prompt_completion", "chat"]
SchedulerType = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
Optimizer = Literal["adamw", "sgd"]
SaveFormat = Literal["hf", "mlx-lm"]


class _Section(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Base of every section: unknown fields are errors."""


class QuantizationConfig(_Section):
    """How the frozen base is quantised as it is loaded (QLoRA): transformers ``BitsAndBytesConfig`` names on torch,
    mlx-lm's ``bits`` / ``group_size`` on MLX.

    A field left out takes its library's default (``bnb_4bit_quant_type`` fp4, no double quantisation, float32
    compute; ``group_size`` 64); whether a field was written at all is what the cross-field rules check, so the
    optional fields default to null rather than to the library's value."""

    load_in_4bit: Annotated[
        bool, Meta(description="torch: load the linear layers as bitsandbytes 4-bit (Linear4bit).")
    ] = False
    load_in_8bit: Annotated[
        bool, Meta(description="torch: load the linear layers as bitsandbytes LLM.int8 (Linear8bitLt).")
    ] = False
    bnb_4bit_quant_type: Annotated[
        Literal["nf4", "fp4"] | None, Meta(description="torch, 4-bit: the 4-bit code; null: fp4.")
    ] = None
    bnb_4bit_use_double_quant: Annotated[
        bool | None, Meta(description="torch, 4-bit: quantise the block scales too (8-bit, blocks of 256).")
    ] = None
    bnb_4bit_compute_dtype: Annotated[
        Literal["float32", "bfloat16", "float16"] | None,
        Meta(description="torch, 4-bit: dtype of the 4-bit matmul; null: float32."),
    ] = None
    bits: Annotated[
        Literal[2, 3, 4, 5, 6, 8] | None,
        Meta(description="mlx: bits per weight of MLX affine quantisation (mlx-lm's q_bits); null: 4."),
    ] = None
    group_size: Annotated[
        Literal[32, 64, 128] | None,
        Meta(description="mlx: weights sharing one scale and bias (mlx-lm's q_group_size); null: 64."),
    ] = None


TORCH_QUANTIZATION = (
    "load_in_4bit",
    "load_in_8bit",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_compute_dtype",
)
"""``model.quantization`` fields only the torch backend (bitsandbytes) reads."""
MLX_QUANTIZATION = ("bits", "group_size")
"""``model.quantization`` fields only the MLX backend reads."""


class ModelConfig(_Section):
    """The base model: a local HF checkpoint folder, optionally quantised as it is loaded."""

    path: Annotated[
        str, Meta(min_length=1, description="Local HF checkpoint folder (config, weights, tokenizer).")
    ]
    quantization: Annotated[
        QuantizationConfig | None,
        Meta(description="Quantise the frozen base on load (QLoRA); a quantised folder needs none."),
    ] = None


class DataConfig(_Section):
    """Where the examples come from and how they become token sequences."""

    train: Annotated[str, Meta(min_length=1, description="JSON Lines file of training examples.")]
    valid: Annotated[str | None, Meta(description="JSON Lines file of held-out examples (eval loss).")] = None
    format: Annotated[
        DataFormat,
        Meta(description="Example shape: {text}, {prompt, completion} or chat {messages}; auto detects it."),
    ] = "auto"
    mask_prompt: Annotated[
        bool, Meta(description="Count the loss only on completion / assistant tokens.")
    ] = False
    max_seq_length: Annotated[
        int, Meta(ge=2, le=1_048_576, description="Longer sequences are truncated (with a warning).")
    ] = 2048


class TrainingConfig(_Section):
    """Optimisation settings; the names and meanings are transformers ``TrainingArguments``'."""

    learning_rate: Annotated[float, Meta(gt=0.0, le=10.0, description="Peak learning rate.")] = 5.0e-5
    lr_scheduler_type: Annotated[SchedulerType, Meta(description="transformers' get_scheduler name.")] = (
        "linear"
    )
    lr_scheduler_kwargs: Annotated[
        dict[str, float],
        Meta(
            description="Extra scheduler arguments: num_cycles (cosine kinds), power and lr_end (polynomial)."
        ),
    ] = field(default_factory=dict)
    warmup_steps: Annotated[
        NonNegativeInt, Meta(description="Linear warm-up steps; overrides warmup_ratio.")
    ] = 0
    warmup_ratio: Annotated[Fraction, Meta(description="Warm-up as a fraction of the total steps.")] = 0.0
    max_steps: Annotated[
        PositiveInt | None, Meta(description="Optimizer steps to run; overrides num_train_epochs.")
    ] = None
    num_train_epochs: Annotated[PositiveFloat, Meta(description="Passes over the training data.")] = 3.0
    per_device_train_batch_size: Annotated[PositiveInt, Meta(description="Sequences per micro-batch.")] = 8
    per_device_eval_batch_size: Annotated[PositiveInt, Meta(description="Sequences per eval batch.")] = 8
    gradient_accumulation_steps: Annotated[
        PositiveInt, Meta(description="Micro-batches summed into one optimizer step.")
    ] = 1
    max_grad_norm: Annotated[
        NonNegativeFloat, Meta(description="Clip the global gradient norm to this (0: no clipping).")
    ] = 1.0
    optim: Annotated[Optimizer, Meta(description="adamw (decoupled weight decay) or sgd.")] = "adamw"
    adam_beta1: Annotated[OpenFraction, Meta(description="AdamW's first-moment decay.")] = 0.9
    adam_beta2: Annotated[OpenFraction, Meta(description="AdamW's second-moment decay.")] = 0.999
    adam_epsilon: Annotated[PositiveFloat, Meta(description="AdamW's denominator epsilon.")] = 1.0e-8
    weight_decay: Annotated[
        NonNegativeFloat, Meta(description="Decoupled weight decay (AdamW) or L2 (SGD).")
    ] = 0.0
    seed: Annotated[NonNegativeInt, Meta(description="Seeds adapter init, dropout and data order.")] = 42
    logging_steps: Annotated[PositiveInt, Meta(description="Log (and print) every this many steps.")] = 10
    eval_steps: Annotated[
        PositiveInt | None, Meta(description="Evaluate on data.valid every this many steps (and at the end).")
    ] = None
    save_steps: Annotated[
        PositiveInt | None, Meta(description="Write a checkpoint every this many steps.")
    ] = None
    save_total_limit: Annotated[
        PositiveInt | None, Meta(description="Keep at most this many checkpoints (oldest pruned).")
    ] = None
    gradient_checkpointing: Annotated[
        bool, Meta(description="Recompute activations in the backward pass to save memory.")
    ] = False


class GenerationCheck(_Section):
    """A held-out generation metric printed before and after training: greedy completions of prompts scored by
    exact match against their reference completions."""

    data: Annotated[
        str | None, Meta(description="prompt/completion JSON Lines file; default: data.valid.")
    ] = None
    max_new_tokens: Annotated[int, Meta(ge=1, le=4096, description="Tokens generated per prompt.")] = 32
    limit: Annotated[PositiveInt, Meta(description="Examples scored at most.")] = 64
    show: Annotated[NonNegativeInt, Meta(description="Sample generations printed.")] = 2


class TrainFile(_Section):
    """A ``peftdecl train`` run: the model, the adapter, the data, the optimisation and where results go."""

    model: Annotated[
        Annotated[str, Meta(min_length=1)] | ModelConfig,
        Meta(description="Local HF checkpoint folder, or {path, quantization} to quantise it on load."),
    ]
    adapter: Annotated[
        str | dict[str, Any],
        Meta(description="Adapter spec: a path, or an inline spec of any kind (peft_type)."),
    ]
    data: DataConfig
    output_dir: Annotated[str, Meta(min_length=1, description="Where logs, checkpoints and the adapter go.")]
    backend: Annotated[
        Literal["torch", "mlx"] | None, Meta(description="Default: mlx on Apple silicon, otherwise torch.")
    ] = None
    device: Annotated[Literal["cpu", "cuda", "auto"], Meta(description="torch only: where to train.")] = (
        "auto"
    )
    dtype: Annotated[
        Literal["float32", "bfloat16", "float16"], Meta(description="dtype the base model is loaded in.")
    ] = "float32"
    training: TrainingConfig = field(default_factory=TrainingConfig)
    save_formats: Annotated[
        list[SaveFormat],
        Meta(
            min_length=1,
            description="Formats of the final adapter (output_dir/adapter); mlx-lm adds adapters.safetensors.",
            extra_json_schema={"uniqueItems": True},
        ),
    ] = field(default_factory=lambda: ["hf"])
    generation_check: Annotated[
        GenerationCheck | None, Meta(description="Optional held-out generation metric, before and after.")
    ] = None

    @property
    def model_path(self) -> str:
        """The model folder, however ``model`` was written."""
        return self.model if isinstance(self.model, str) else self.model.path

    @property
    def quantization(self) -> QuantizationConfig | None:
        """``model.quantization``, or None for a plain ``model: PATH``."""
        return None if isinstance(self.model, str) else self.model.quantization


SCHEMA_FILE = "train.schema.json"
_SECTIONS = {"DataConfig": DataConfig, "TrainingConfig": TrainingConfig, "GenerationCheck": GenerationCheck}


def train_schema(published: bool = True) -> dict[str, Any]:
    """The training file's JSON Schema, generated from :class:`TrainFile` with every section inlined.

    ``published`` (the ``schemas/train.schema.json`` text): ``adapter``'s inline branch is a ``$ref`` to
    ``adapter.schema.json``. Otherwise (validation in memory) that branch is any object, which
    :func:`peftdecl.load_spec` then checks, so the adapter's errors come from one place.
    """
    from peftdecl.schema import SCHEMA_BASE_URL, SCHEMA_DIALECT, UNION_FILE, harden

    generated = msgspec.json.schema(TrainFile)
    defs: dict[str, Any] = generated["$defs"]
    body = _inline(defs.pop("TrainFile"), defs)
    props: dict[str, Any] = body["properties"]
    for name, section in (("data", DataConfig), ("training", TrainingConfig)):
        props[name] = {"description": _first_line(section.__doc__), **props[name]}
    inline: dict[str, Any] = {"$ref": UNION_FILE} if published else {"type": "object"}
    props["adapter"]["anyOf"] = [{"type": "string", "minLength": 1}, inline]
    props["save_formats"]["default"] = ["hf"]  # a default_factory, which msgspec leaves out of the schema
    body["title"] = "peftdecl training file"
    body["description"] = _first_line(TrainFile.__doc__)
    hardened: dict[str, Any] = harden(body)
    return {"$schema": SCHEMA_DIALECT, "$id": SCHEMA_BASE_URL + SCHEMA_FILE, **hardened}


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with each ``{"$ref": "#/$defs/X"}`` replaced by X's body (the sections are not recursive)."""
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target = dict(defs[ref.removeprefix("#/$defs/")])
        target.pop("title", None)
        target["description"] = _first_line(str(target.get("description", "")))
        return _inline({**target, **{k: v for k, v in schema.items() if k != "$ref"}}, defs)
    return {key: _inline(value, defs) for key, value in schema.items()}


def _first_line(doc: str | None) -> str:
    """A docstring's first paragraph on one line, with Markdown's single backticks for code."""
    return " ".join((doc or "").strip().split("\n\n")[0].split()).replace("``", "`")


def to_dict(config: TrainFile) -> dict[str, Any]:
    """The file as plain JSON-able data (defaults included), e.g. for ``trainer_state.json``."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    return data
