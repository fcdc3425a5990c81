"""Training data files: the three JSON Lines shapes tokenised as mlx-lm's datasets tokenise them (same token
lists and prompt offsets, compared exactly), truncation, and every bad-input error naming ``file:line``."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from peftdecl.errors import DataError
from peftdecl.train import data as data_module
from peftdecl.train.config import DataConfig
from peftdecl.train.data import load_dataset, load_pairs, prompt_ids
from peftdecl.train.tiny_model import build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

# A small template with what real ones have: a BOS per turn, an assistant header for generation, tools, and an
# error raised from inside the template for a role it does not know.
CHAT_TEMPLATE = (
    "{% if tools %}<s>tools:{{ tools | length }}</s>{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}"
    "{% endif %}<s>{{ m['role'] }}:{{ m['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {}}}]

CHATS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6"},
        ]
    },
    {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "last word is mine"}]},
    {
        "messages": [{"role": "user", "content": "sum"}, {"role": "assistant", "content": "ok"}],
        "tools": TOOLS,
    },
]
PAIRS = [
    {"prompt": "Q: 1+1=", "completion": " 2"},
    {"prompt": "", "completion": "empty prompt"},
    {"prompt": "say hi", "completion": "hi</s>"},
]
TEXTS = [{"text": "plain text"}, {"text": "already ends</s>"}, {"text": ""}, {"text": "new\nline"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=16, layers=1, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def chat_tokenizer(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the folder whose tokenizer ships a chat template (``chat_template.jinja``, as HF folders do)."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(model_dir, folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    loaded = transformers.AutoTokenizer.from_pretrained(folder)
    assert loaded.chat_template == CHAT_TEMPLATE
    return loaded


def write_lines(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def at(path: Path, line: int | None = None) -> str:
    """A pattern for an error message starting with ``path`` or ``path:line``."""
    return "^" + re.escape(str(path) if line is None else f"{path}:{line}")


def config(**fields: object) -> DataConfig:
    return DataConfig(train="unused.jsonl", **fields)  # type: ignore[arg-type]


def as_lists(dataset) -> list[tuple[list[int], int]]:
    return [(e.tokens.tolist(), e.offset) for e in dataset.examples]


def mlx_lm_processed(
    kind: str, rows: list[dict], tokenizer, mask_prompt: bool
) -> list[tuple[list[int], int]]:
    """mlx-lm's own tokens and offsets for the same rows (its TextDataset/CompletionsDataset/ChatDataset)."""
    datasets = pytest.importorskip("mlx_lm.tuner.datasets")
    if kind == "text":
        made = datasets.TextDataset(rows, tokenizer)
    elif kind == "prompt_completion":
        made = datasets.CompletionsDataset(rows, tokenizer, "prompt", "completion", mask_prompt)
    else:
        made = datasets.ChatDataset(rows, tokenizer, mask_prompt=mask_prompt)
    return [
        (list(tokens), int(offset)) for tokens, offset in (made.process(made[i]) for i in range(len(made)))
    ]


# -- the three shapes, against mlx-lm ---------------------------------------------------------------------
def test_text_matches_mlx_lm_and_appends_one_eos(tmp_path, tokenizer):
    rows = [TEXTS[0], TEXTS[1], TEXTS[3]]  # mlx-lm cannot process an empty text (it indexes the last token)
    got = load_dataset(write_lines(tmp_path / "t.jsonl", rows), tokenizer, config())
    assert got.format == "text" and got.truncated == 0
    eos = tokenizer.eos_token_id
    assert as_lists(got) == [
        ([*tokenizer.encode("plain text"), eos], 0),
        (tokenizer.encode("already ends</s>"), 0),  # ends with EOS already: no second one
        ([*tokenizer.encode("new\nline"), eos], 0),
    ]
    assert as_lists(got) == mlx_lm_processed("text", rows, tokenizer, False)


def test_empty_text_is_eos_only(tmp_path, tokenizer):
    got = load_dataset(write_lines(tmp_path / "t.jsonl", [{"text": ""}]), tokenizer, config())
    assert as_lists(got) == [([tokenizer.eos_token_id], 0)]


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_prompt_completion_with_template_matches_mlx_lm(tmp_path, chat_tokenizer, mask_prompt):
    path = write_lines(tmp_path / "pc.jsonl", PAIRS)
    got = load_dataset(path, chat_tokenizer, config(mask_prompt=mask_prompt))
    assert got.format == "prompt_completion"
    for (tokens, offset), row in zip(as_lists(got), PAIRS, strict=True):
        conversation = f"<s>user:{row['prompt']}</s><s>assistant:{row['completion']}</s>"
        assert chat_tokenizer.decode(tokens) == conversation
        counted = (
            row["completion"] + "</s>" if mask_prompt else conversation
        )  # the completion and its turn's end
        assert chat_tokenizer.decode(tokens[offset:]) == counted
    assert as_lists(got) == mlx_lm_processed("prompt_completion", PAIRS, chat_tokenizer, mask_prompt)


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_prompt_completion_without_template(tmp_path, tokenizer, mask_prompt):
    got = load_dataset(write_lines(tmp_path / "pc.jsonl", PAIRS), tokenizer, config(mask_prompt=mask_prompt))
    eos = tokenizer.eos_token_id
    for (tokens, offset), row in zip(as_lists(got), PAIRS, strict=True):
        head = tokenizer.encode(row["prompt"])
        tail = tokenizer.encode(row["completion"], add_special_tokens=False)
        assert tokens == (head + tail if tail[-1:] == [eos] else head + tail + [eos])
        assert offset == (len(head) if mask_prompt else 0)
        assert tokenizer.decode(tokens) == row["prompt"] + row["completion"].removesuffix("</s>") + "</s>"


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_chat_matches_mlx_lm(tmp_path, chat_tokenizer, mask_prompt):
    got = load_dataset(
        write_lines(tmp_path / "c.jsonl", CHATS), chat_tokenizer, config(mask_prompt=mask_prompt)
    )
    assert got.format == "chat"
    assert as_lists(got) == mlx_lm_processed("chat", CHATS, chat_tokenizer, mask_prompt)


def test_chat_offsets_by_the_last_speaker(tmp_path, chat_tokenizer):
    """mlx-lm's rule, checked on decoded text independently of it: the prompt ends with the assistant header
    when the last message is the assistant's, and at the end of the previous turn otherwise."""
    got = load_dataset(write_lines(tmp_path / "c.jsonl", CHATS), chat_tokenizer, config(mask_prompt=True))
    decoded = [chat_tokenizer.decode(e.tokens[e.offset :].tolist()) for e in got.examples]
    assert decoded == ["hello!</s>", "6</s>", "<s>user:last word is mine</s>", "ok</s>"]
    tools = chat_tokenizer.decode(got.examples[3].tokens.tolist())
    assert tools.startswith("<s>tools:1</s>")  # the line's tools reached the template


def test_prompt_ids_are_the_trained_prefix(tmp_path, tokenizer, chat_tokenizer):
    """The generation check's prompt tokens equal the tokens training saw before the completion."""
    path = write_lines(tmp_path / "pc.jsonl", PAIRS)
    for tok in (tokenizer, chat_tokenizer):
        got = load_dataset(path, tok, config(mask_prompt=True))
        for example, row in zip(got.examples, PAIRS, strict=True):
            assert prompt_ids(tok, row["prompt"]) == example.tokens[: example.offset].tolist()


def test_auto_blank_lines_and_explicit_format(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text('\n{"text": "a"}\n   \n\n{"text": "bc"}\n')
    assert [len(e.tokens) for e in load_dataset(path, tokenizer, config()).examples] == [2, 3]
    assert load_dataset(path, tokenizer, config(format="text")).format == "text"
    with pytest.raises(DataError, match=at(path) + r":2: expected prompt_completion examples.*data.format"):
        load_dataset(path, tokenizer, config(format="prompt_completion"))


def test_truncation_counts_and_warns_once(tmp_path, tokenizer):
    rows = [{"prompt": "p" * n, "completion": "c" * 4} for n in (1, 6, 9, 2, 12)]
    path = write_lines(tmp_path / "long.jsonl", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = load_dataset(path, tokenizer, config(mask_prompt=True, max_seq_length=8))
    assert got.truncated == 3 and got.max_seq_length == 8
    assert [len(e.tokens) for e in got.examples] == [6, 8, 8, 7, 8]
    assert [e.offset for e in got.examples] == [1, 6, 9, 2, 12]  # offsets stay: a cut prompt counts nothing
    assert [e.tokens.dtype for e in got.examples] == [np.dtype(np.int32)] * 5
    assert [str(w.message) for w in caught] == [
        f"{path}: 3 of 5 sequences are longer than max_seq_length=8 tokens and were truncated"
    ]


def test_load_pairs(tmp_path):
    path = write_lines(tmp_path / "pc.jsonl", PAIRS)
    assert load_pairs(path, 2) == [(r["prompt"], r["completion"]) for r in PAIRS[:2]]
    assert load_pairs(path, 10) == [(r["prompt"], r["completion"]) for r in PAIRS]
    with pytest.raises(
        DataError, match=at(tmp_path / "t.jsonl") + r":1: expected prompt_completion .*generation"
    ):
        load_pairs(write_lines(tmp_path / "t.jsonl", TEXTS), 3)


# -- errors --------------------------------------------------------------------------------------------------
BAD_LINES = [
    # (file text, the line at fault, what the message says)
    ('{"text": "a"}\n{"text": "b",}\n', 2, r"invalid JSON"),
    ('{"text": "a"}\n\n[1, 2]\n', 3, r"expected a JSON object, got an array"),
    ('"just a string"\n', 1, r"expected a JSON object, got a string"),
    ('{"prompt": "a"}\n', 1, r"unknown example shape \['prompt'\]"),
    ('{"text": "a"}\n{"txt": "b"}\n', 2, r"expected text examples.*line 1.*missing 'text'; unexpected 'txt'"),
    ('{"text": "a", "id": 3}\n', 1, r"unexpected 'id'"),
    ('{"text": 5}\n', 1, r"'text' must be a string, got a number"),
    ('{"prompt": "a", "completion": null}\n', 1, r"'completion' must be a string, got null"),
    (
        '{"prompt": "a", "completion": "b"}\n{"text": "c"}\n',
        2,
        r"expected prompt_completion .*missing 'prompt'",
    ),
    ('{"messages": "hi"}\n', 1, r"'messages' must be a non-empty array"),
    ('{"messages": []}\n', 1, r"'messages' must be a non-empty array"),
    ('{"messages": ["hi"]}\n', 1, r"messages\[0\] must be an object, got a string"),
    ('{"messages": [{"role": "user"}]}\n', 1, r"messages\[0\] needs a string 'content' \(missing\)"),
    ('{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}\n', 1, r"messages\[1\].* 'role'"),
    ('{"messages": [{"role": 1, "content": "a"}]}\n', 1, r"messages\[0\] needs a string 'role' \(a number\)"),
    ('{"messages": [{"role": "user", "content": "a"}], "tools": {}}\n', 1, r"'tools' must be an array"),
    ('{"messages": [{"role": "bot", "content": "a"}]}\n', 1, r"chat template failed.*unknown role bot"),
    ('{"text": "a"}\n\xff\n', 2, r"not UTF-8"),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, chat_tokenizer, text, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(text.encode("utf-8") if "\xff" not in text else text.encode("latin-1"))
    with pytest.raises(DataError, match=at(path, line) + rf": .*{message}"):
        load_dataset(path, chat_tokenizer, config())


def test_config_and_tokenizer_mismatches(tmp_path, tokenizer, chat_tokenizer):
    chat = write_lines(tmp_path / "c.jsonl", CHATS)
    with pytest.raises(
        DataError, match=at(chat) + r":1: chat examples need a tokenizer with a chat template"
    ):
        load_dataset(chat, tokenizer, config())
    texts = write_lines(tmp_path / "t.jsonl", TEXTS)
    with pytest.raises(DataError, match=at(texts) + r":1: data.mask_prompt needs prompt/completion or chat"):
        load_dataset(texts, tokenizer, config(mask_prompt=True))
    lone = write_lines(tmp_path / "lone.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    assert len(load_dataset(lone, chat_tokenizer, config()).examples) == 1
    with pytest.raises(
        DataError, match=at(lone) + r":1: with data.mask_prompt a chat example needs a message"
    ):
        load_dataset(lone, chat_tokenizer, config(mask_prompt=True))
    tools = write_lines(tmp_path / "tools.jsonl", [{"prompt": "a", "completion": "b", "tools": TOOLS}])
    with pytest.raises(DataError, match=at(tools) + r":1: 'tools' needs a tokenizer with a chat template"):
        load_dataset(tools, tokenizer, config())


def test_missing_empty_and_oversized_files(tmp_path, tokenizer, monkeypatch):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=at(missing) + r": no such data file"):
        load_dataset(missing, tokenizer, config())
    with pytest.raises(DataError, match=at(tmp_path) + r": not a file"):
        load_dataset(tmp_path, tokenizer, config())
    for text in ("", "\n  \n\n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(DataError, match=r"empty.jsonl: no examples"):
            load_dataset(tmp_path / "empty.jsonl", tokenizer, config())
        with pytest.raises(DataError, match=r"empty.jsonl: no examples"):
            load_pairs(tmp_path / "empty.jsonl", 4)
    path = write_lines(tmp_path / "t.jsonl", [{"text": "short"}, {"text": "x" * 40}])
    monkeypatch.setattr(data_module, "MAX_LINE_BYTES", 30)
    with pytest.raises(DataError, match=at(path) + r":2: line longer than 30 bytes"):
        load_dataset(path, tokenizer, config())
    monkeypatch.setattr(data_module, "MAX_FILE_BYTES", 40)
    with pytest.raises(DataError, match=at(path) + r": \d+ bytes, more than the 40"):
        load_dataset(path, tokenizer, config())
