"""Write the example's data: sort the letters of a short lowercase word (``"dcab="`` → ``"abcd"``).

Deterministic (a seeded ``random.Random``), so running it again rewrites identical files. The held-out split
shares no letter multiset with the training split: every valid answer is a sorted string the model never saw.

    python examples/finetune/make_data.py [OUT_DIR]        # default: examples/finetune/data
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

SEED = 0
MIN_LETTERS, MAX_LETTERS = 3, 6
TRAIN_EXAMPLES, VALID_EXAMPLES = 4000, 200
SEPARATOR = "="
"""Ends every prompt: the model answers after it."""


def example(word: str) -> dict[str, str]:
    """One prompt/completion pair: the word and its letters in alphabetical order."""
    return {"prompt": word + SEPARATOR, "completion": "".join(sorted(word))}


def splits(seed: int = SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, valid) examples; no two share a word, and no valid word is an anagram of a training word."""
    rng = random.Random(seed)
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < TRAIN_EXAMPLES + VALID_EXAMPLES:
        word = "".join(
            rng.choice(string.ascii_lowercase) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS))
        )
        key = "".join(
            sorted(word)
        )  # anagrams share the answer, so they are one "example" for held-out purposes
        if key not in seen:
            seen.add(key)
            words.append(word)
    return [example(w) for w in words[:TRAIN_EXAMPLES]], [example(w) for w in words[TRAIN_EXAMPLES:]]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """One JSON object a line, keys in a fixed order, ``\\n`` line ends."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8", newline="\n")


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent / "data"
    out.mkdir(parents=True, exist_ok=True)
    train, valid = splits()
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "valid.jsonl", valid)
    print(f"wrote {len(train)} training and {len(valid)} held-out examples to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
