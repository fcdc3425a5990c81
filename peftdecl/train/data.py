"""Training data: JSON Lines examples read, checked line by line and tokenised into token sequences.

Three shapes, as mlx-lm reads them: ``{"text"}`` (the whole sequence is trained on), ``{"prompt", "completion"}``
and chat ``{"messages": [{"role", "content"}, ...]}`` (optionally ``"tools"``, handed to the chat template). With
``mask_prompt`` an example's ``offset`` is the number of tokens before the completion / last message: the loss
counts only targets at positions ``≥ offset`` (see :class:`peftdecl.train.runtime.MicroBatch`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Generator, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peftdecl.errors import DataError
from peftdecl.train.config import DataConfig
from peftdecl.train.runtime import Tokenizer

MAX_FILE_BYTES = 4 * 2**30
"""A data file larger than this (4 GiB) is refused: every example is held in memory as tokens."""
MAX_LINE_BYTES = 16 * 2**20
"""A line longer than this (16 MiB) is refused before it is parsed."""

FORMATS = ("text", "prompt_completion", "chat")
_REQUIRED = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",)}
_OPTIONAL = {"text": (), "prompt_completion": ("tools",), "chat": ("tools",)}

JsonRecord = dict[str, object]
Message = dict[str, object]


@dataclass(frozen=True)
class Example:
    """One tokenised example: ``tokens`` int32 ``[n]`` (already cut to max_seq_length) and ``offset``, the first
    position counted as a target (0 unless mask_prompt)."""

    tokens: np.ndarray
    offset: int


@dataclass(frozen=True)
class Dataset:
    """A tokenised data file: its examples in file order and how many were truncated."""

    path: Path
    format: str
    examples: tuple[Example, ...]
    truncated: int
    """Sequences that were longer than max_seq_length tokens and were cut to it."""
    max_seq_length: int | None = None
    """The cut applied (batches of this data are padded to at most this width); None: no cap."""


# -- reading ----------------------------------------------------------------------------------------------------
def _records(path: Path) -> Iterator[tuple[int, JsonRecord]]:
    """(line number, JSON object) of every non-blank line; DataError names ``file:line`` for a bad one."""
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if not path.is_file():
        raise DataError(f"{path}: not a file (expected a JSON Lines file)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {size} bytes, more than the {MAX_FILE_BYTES} a data file may hold")
    seen = False
    with path.open("rb") as stream:
        number = 0
        while True:
            raw = stream.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{number}: line longer than {MAX_LINE_BYTES} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {_json_type(value)}")
            seen = True
            yield number, value
    if not seen:
        raise DataError(f"{path}: no examples (the file is empty or holds only blank lines)")


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _shape_of(keys: set[str]) -> str | None:
    """The format a line's keys announce (auto-detection, mlx-lm's order), or None."""
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "messages" in keys:
        return "chat"
    if "text" in keys:
        return "text"
    return None


def _expected(fmt: str) -> str:
    required = " and ".join(repr(k) for k in _REQUIRED[fmt])
    optional = "".join(f" (optional {k!r})" for k in _OPTIONAL[fmt])
    return f"{fmt} examples: an object with {required}{optional}"


def _check(record: JsonRecord, fmt: str, where: str, why: str) -> None:
    """The record has exactly the format's keys and string values (chat: a list of role/content messages)."""
    keys = set(record)
    missing = [k for k in _REQUIRED[fmt] if k not in keys]
    extra = sorted(keys - set(_REQUIRED[fmt]) - set(_OPTIONAL[fmt]))
    if missing or extra:
        parts = [f"missing {', '.join(map(repr, missing))}"] if missing else []
        parts += [f"unexpected {', '.join(map(repr, extra))}"] if extra else []
        raise DataError(f"{where}: expected {_expected(fmt)} ({why}); {'; '.join(parts)}")
    for key in ("text", "prompt", "completion"):
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {_json_type(record[key])}")
    if "tools" in record and not isinstance(record["tools"], list):
        raise DataError(f"{where}: 'tools' must be an array, got {_json_type(record['tools'])}")
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty array of {{role, content}} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataError(f"{where}: messages[{i}] must be an object, got {_json_type(message)}")
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    got = "missing" if key not in message else _json_type(message[key])
                    raise DataError(f"{where}: messages[{i}] needs a string {key!r} ({got})")


def _checked_records(
    path: Path, fmt: str, why: str = ""
) -> Generator[tuple[int, str, JsonRecord], None, None]:
    """(line, format, record) with every line in the same format: ``fmt`` or, for auto, the first line's;
    ``why`` says in errors where the expected format came from."""
    chosen = None if fmt == "auto" else fmt
    why = why or f"data.format is {fmt}"
    for number, record in _records(path):
        where = f"{path}:{number}"
        if chosen is None:
            chosen = _shape_of(set(record))
            if chosen is None:
                shapes = "; ".join(_expected(f) for f in FORMATS)
                raise DataError(f"{where}: unknown example shape {sorted(record)}; expected one of: {shapes}")
            why = f"the format of line {number}"
        _check(record, chosen, where, why)
        yield number, chosen, record


# -- tokenising -------------------------------------------------------------------------------------------------
def _ids(result: object, where: str) -> list[int]:
    """Token ids from ``encode``/``apply_chat_template`` (a list, or a mapping holding ``input_ids``)."""
    if isinstance(result, Mapping):
        result = result.get("input_ids")
    if not isinstance(result, list) or not all(isinstance(t, int) for t in result):
        raise DataError(f"{where}: the tokenizer returned {type(result).__name__}, not a list of token ids")
    return result


def _template(tokenizer: Tokenizer, messages: list[Message], where: str, **options: object) -> list[int]:
    """The conversation through the tokenizer's chat template, tokenised."""
    try:
        result = tokenizer.apply_chat_template(
            messages,  # type: ignore[arg-type]
            tokenize=True,
            return_dict=False,
            **options,
        )
    except Exception as exc:  # a template is third-party Jinja code: any error it raises is the data's fault
        raise DataError(f"{where}: the tokenizer's chat template failed on this example: {exc}") from exc
    return _ids(result, where)


def _with_eos(tokens: list[int], eos: int | None) -> list[int]:
    return [*tokens, eos] if eos is not None and (not tokens or tokens[-1] != eos) else tokens


def _tokenise(
    record: JsonRecord, fmt: str, tokenizer: Tokenizer, mask_prompt: bool, where: str
) -> tuple[list[int], int]:
    """(tokens, offset) of one checked record; offset 0 unless ``mask_prompt``."""
    has_template = bool(tokenizer.chat_template)
    tools = {"tools": record["tools"]} if "tools" in record else {}
    if fmt == "text":
        return _with_eos(_ids(tokenizer.encode(str(record["text"])), where), tokenizer.eos_token_id), 0
    if fmt == "prompt_completion":
        prompt, completion = str(record["prompt"]), str(record["completion"])
        if has_template:
            user: Message = {"role": "user", "content": prompt}
            conversation: list[Message] = [user, {"role": "assistant", "content": completion}]
            tokens = _template(tokenizer, conversation, where, **tools)
            if not mask_prompt:
                return tokens, 0
            return tokens, len(_template(tokenizer, [user], where, add_generation_prompt=True, **tools))
        if tools:
            raise DataError(f"{where}: 'tools' needs a tokenizer with a chat template; this one has none")
        head = _ids(tokenizer.encode(prompt), where)
        tail = _ids(tokenizer.encode(completion, add_special_tokens=False), where)
        return _with_eos(head + tail, tokenizer.eos_token_id), len(head) if mask_prompt else 0
    if not has_template:
        raise DataError(f"{where}: chat examples need a tokenizer with a chat template; this one has none")
    messages: list[Message] = list(record["messages"])  # type: ignore[call-overload]
    tokens = _template(tokenizer, messages, where, **tools)
    if not mask_prompt:
        return tokens, 0
    if len(messages) < 2:
        raise DataError(f"{where}: with data.mask_prompt a chat example needs a message before the last one")
    # mlx-lm's rule: the prompt is every message but the last, with the assistant header when the last speaks
    generation = messages[-1].get("role") == "assistant"
    return tokens, len(_template(tokenizer, messages[:-1], where, add_generation_prompt=generation, **tools))


def load_dataset(path: Path, tokenizer: Tokenizer, data: DataConfig) -> Dataset:
    """Read, check and tokenise a JSON Lines file; sequences over ``data.max_seq_length`` tokens are cut to it
    (counted in ``truncated``, one warning per file). Raises DataError naming ``file:line`` for a bad line."""
    examples: list[Example] = []
    chosen, truncated = "", 0
    limit = data.max_seq_length
    for number, fmt, record in _checked_records(path, data.format):
        if fmt == "text" and data.mask_prompt:
            raise DataError(
                f"{path}:{number}: data.mask_prompt needs prompt/completion or chat examples; these are text"
            )
        chosen = fmt
        tokens, offset = _tokenise(record, fmt, tokenizer, data.mask_prompt, f"{path}:{number}")
        if len(tokens) > limit:
            truncated += 1
            tokens = tokens[:limit]
        examples.append(Example(np.asarray(tokens, dtype=np.int32), offset))
    if truncated:
        warnings.warn(
            f"{path}: {truncated} of {len(examples)} sequences are longer than max_seq_length={limit} tokens "
            "and were truncated",
            stacklevel=2,
        )
    return Dataset(path, chosen, tuple(examples), truncated, limit)


def load_pairs(path: Path, limit: int) -> list[tuple[str, str]]:
    """The first ``limit`` (prompt, completion) texts of a prompt/completion file (the generation check)."""
    pairs: list[tuple[str, str]] = []
    if limit < 1:
        return pairs
    why = "the generation check reads prompt/completion examples"
    with closing(_checked_records(path, "prompt_completion", why)) as records:
        for _, _, record in records:
            pairs.append((str(record["prompt"]), str(record["completion"])))
            if len(pairs) >= limit:
                break
    return pairs


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens exactly as training saw them before the completion: the chat template's user turn
    with the generation prompt when the tokenizer has a template, else ``encode(prompt)``."""
    if tokenizer.chat_template:
        user: Message = {"role": "user", "content": prompt}
        return _template(tokenizer, [user], "prompt", add_generation_prompt=True)
    return _ids(tokenizer.encode(prompt), "prompt")
