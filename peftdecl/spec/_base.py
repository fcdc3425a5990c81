"""Fields and checks shared by every adapter spec.

A spec is a frozen msgspec Struct whose field names and defaults are HF PEFT's, tagged by ``peft_type``.
Fields that HF PEFT has but peftdecl does not implement are declared in ``UNSUPPORTED``: they are accepted at
their default (PEFT writes every field into ``adapter_config.json``) and rejected with a clear message otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Annotated, ClassVar, Literal, Protocol, TypeVar

import msgspec
from msgspec import Meta

from peftdecl._json import JsonObject
from peftdecl.errors import SpecError
from peftdecl.spec.limits import MAX_ALPHA, MAX_DIM, MAX_FINITE, MAX_PATTERNS, MAX_RANK

TaskType = Literal["SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"]

TargetModules = Annotated[
    str | tuple[str, ...] | None,
    Meta(
        description="Modules to adapt: a list matches by exact name or '.'-suffix, a string is a full-match regex, "
        "'all-linear' selects every linear layer except the output head; null uses the model type's default."
    ),
]
ExcludeModules = Annotated[
    str | tuple[str, ...] | None,
    Meta(
        description="Modules never adapted: a list matches by exact name or '.'-suffix, a string by full regex."
    ),
]
LayerIndex = Annotated[int, Meta(ge=0, le=MAX_DIM)]
LayersToTransform = Annotated[
    LayerIndex | tuple[LayerIndex, ...] | None,
    Meta(description="Only adapt modules inside these layer indices (needs a list target_modules)."),
]
LayersPattern = Annotated[
    str | tuple[str, ...] | None,
    Meta(
        description="Name of the layer container before the index (e.g. 'layers'); needs layers_to_transform."
    ),
]
ModulesToSave = Annotated[
    tuple[str, ...] | None,
    Meta(description="Modules trained in full and saved beside the adapter (e.g. a classification head)."),
]
Probability = Annotated[float, Meta(ge=0.0, lt=1.0)]
PositiveInt = Annotated[int, Meta(ge=1, le=MAX_DIM)]
"""A count bounded by MAX_DIM (token counts, dimensions, layer counts)."""
Rank = Annotated[int, Meta(ge=1, le=MAX_RANK)]
Alpha = (
    Annotated[int, Meta(ge=-int(MAX_ALPHA), le=int(MAX_ALPHA))]
    | Annotated[float, Meta(ge=-MAX_ALPHA, le=MAX_ALPHA)]
)
"""A scale numerator: finite, |alpha| <= 2^24."""
Finite = Annotated[float, Meta(ge=-MAX_FINITE, le=MAX_FINITE)]
RankPattern = Annotated[
    dict[str, Rank],
    Meta(max_length=MAX_PATTERNS),
    Meta(description="Per-module rank: the first key that matches a module's '.'-suffix wins."),
]
AlphaPattern = Annotated[
    dict[str, Alpha],
    Meta(max_length=MAX_PATTERNS),
    Meta(description="Per-module alpha: the first key that matches a module's '.'-suffix wins."),
]


_S = TypeVar("_S", bound="SpecBase")


def bias_help(own: str) -> str:
    """The description of a kind's ``bias`` field (``own``: its value for the targeted layers' biases)."""
    return f"Base biases trained and saved with the adapter: none, all (every bias of the model) or {own}."


_DEFER_CHECKS = contextvars.ContextVar("peftdecl_defer_spec_checks", default=False)


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """Skip construction-time checks, so a loader can report them itself with their JSON paths."""
    token = _DEFER_CHECKS.set(True)
    try:
        yield
    finally:
        _DEFER_CHECKS.reset(token)


class SpecBase(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="peft_type",
    omit_defaults=False,
):
    """Fields every HF PEFT config carries; subclasses add the kind's own."""

    task_type: TaskType | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    auto_mapping: Annotated[
        dict[str, str] | None,
        Meta(description="The base model's class and library (HF PEFT's AutoPeftModel reads it)."),
    ] = None
    peft_version: str | None = None
    modules_to_save: ModulesToSave = None

    UNSUPPORTED: ClassVar[dict[str, object]] = {}
    """Field name -> the only value peftdecl accepts (HF PEFT's default)."""

    def __post_init__(self) -> None:
        if _DEFER_CHECKS.get():
            return
        problems = self.problems()
        if problems:
            raise SpecError(problems)

    @property
    def peft_type(self) -> str:
        """HF PEFT's name of this adapter kind, e.g. ``"LORA"``."""
        return type(self).__struct_config__.tag  # type: ignore[return-value]

    @property
    def kind(self) -> str:
        """peftdecl's execution kind: the lower-case peft_type, with LoRA + use_dora reported as ``"dora"``."""
        return self.peft_type.lower()

    def problems(self) -> list[tuple[str, str]]:
        """Every cross-field and unsupported-value problem, as ``(json_path, message)`` pairs."""
        found = []
        for name, accepted in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value != accepted and not (accepted == {} and value is None):
                found.append(
                    (
                        f"$.{name}",
                        f"not supported by peftdecl; only the default {_show(accepted)} is accepted",
                    )
                )
        found.extend(self.cross_field_problems())
        from peftdecl.spec.patterns import spec_pattern_problems

        found.extend(spec_pattern_problems(self))
        return found

    def cross_field_problems(self) -> list[tuple[str, str]]:
        """Kind-specific consistency checks; subclasses extend."""
        return []

    def to_dict(self) -> JsonObject:
        """Every field, JSON-ready, with ``peft_type`` included (as HF PEFT writes a config)."""
        decoded: JsonObject = msgspec.json.decode(msgspec.json.encode(self))
        return decoded

    def replace(self: _S, **changes: object) -> _S:
        """A copy with ``changes`` applied and checked again."""
        return msgspec.structs.replace(self, **changes)


def _show(value: object) -> str:
    return msgspec.json.encode(value).decode()


class Targeted(Protocol):
    """A spec with HF PEFT's ``target_modules`` field (the layer-selecting kinds)."""

    @property
    def target_modules(self) -> str | tuple[str, ...] | None: ...


def targeting_problems(spec: Targeted) -> list[tuple[str, str]]:
    """HF PEFT's rules tying ``layers_to_transform``, ``layers_pattern`` and a regex ``target_modules``."""
    found = []
    layers_to_transform = getattr(spec, "layers_to_transform", None)
    layers_pattern = getattr(spec, "layers_pattern", None)
    if isinstance(spec.target_modules, str):
        if layers_to_transform is not None:
            found.append(
                ("$.layers_to_transform", "cannot be used when target_modules is a regex string; use a list")
            )
        if layers_pattern is not None:
            found.append(
                ("$.layers_pattern", "cannot be used when target_modules is a regex string; use a list")
            )
    if layers_pattern is not None and layers_to_transform is None:
        found.append(("$.layers_pattern", "needs layers_to_transform to be set"))
    return found
