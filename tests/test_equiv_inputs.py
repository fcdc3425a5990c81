"""``run_equivalence`` inputs it cannot compare on are PeftdeclErrors that say what to pass."""

from __future__ import annotations

import pytest

from peftdecl.equiv import run_equivalence
from peftdecl.errors import PeftdeclError

torch = pytest.importorskip("torch")


def test_a_model_without_vocabulary_facts_asks_for_input_ids() -> None:
    # a plain torch module: no config, so neither vocab_size nor word_embeddings is known to draw token ids from
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    spec = {"peft_type": "LORA", "r": 2, "target_modules": ["1"]}
    with pytest.raises(PeftdeclError, match="neither vocab_size nor word_embeddings: pass input_ids"):
        run_equivalence(spec, models={"torch": model}, backend_names=["torch"])
