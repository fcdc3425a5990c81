"""The held-out generation metric printed before and after training: greedy completions of held-out prompts,
scored by exact match (whitespace at both ends ignored) against their reference completions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from peftdecl.train.config import GenerationCheck
from peftdecl.train.data import load_pairs, prompt_ids
from peftdecl.train.runtime import TrainingBackend

if TYPE_CHECKING:
    from peftdecl.train.setup import Run


@dataclass(frozen=True)
class GenerationScore:
    """Exact-match rate over ``count`` prompts and the first few (prompt, produced, expected) triples."""

    exact_match: float
    count: int
    samples: tuple[tuple[str, str, str], ...]


def score_generation(run: Run, check: GenerationCheck) -> GenerationScore:
    """Greedy-complete up to ``check.limit`` held-out prompts and count exact matches."""
    source = check.data or run.config.data.valid
    assert source is not None  # the loader refuses a generation_check with neither
    pairs = load_pairs(Path(source), check.limit)
    backend = cast(TrainingBackend, run.backend)
    eos = run.tokenizer.eos_token_id
    hits, samples = 0, list[tuple[str, str, str]]()
    for prompt, expected in pairs:
        new = backend.generate(run.model, prompt_ids(run.tokenizer, prompt), check.max_new_tokens, eos)
        if eos is not None and new and new[-1] == eos:
            new = new[:-1]
        produced = run.tokenizer.decode(new, skip_special_tokens=True)
        hits += produced.strip() == expected.strip()
        if len(samples) < check.show:
            samples.append((prompt, produced, expected))
    return GenerationScore(hits / len(pairs) if pairs else 0.0, len(pairs), tuple(samples))
