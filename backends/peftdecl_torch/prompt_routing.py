"""Which prompt-learning adapter of the torch engine runs, and how HF PEFT feeds it (seq2seq, task-head or
language-model rules), with the input word embeddings it reads: mixed into
:class:`~peftdecl_torch.engine.TorchEngine`."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from torch import nn

from peftdecl.adapter_book import AdapterBook
from peftdecl.errors import PeftdeclError
from peftdecl.plan import ModelInfo
from peftdecl_torch.kinds.prompt import PromptAdapter
from peftdecl_torch.prompting import PromptCall, PromptSite, prompt_call
from peftdecl_torch.seq2seq import seq2seq_call
from peftdecl_torch.task_heads import HEAD_TASKS, head_rules


class PromptRouting:
    """The engine's model, book, model facts and prompt adapters are read from the engine itself."""

    model: nn.Module
    book: AdapterBook
    _info: ModelInfo
    _prompts: dict[str, PromptAdapter]

    def _active_prompt(self) -> PromptAdapter | None:
        if not self.book.enabled:
            return None
        found = [n for n in self.book.active if n in self._prompts]
        if len(found) > 1:
            raise PeftdeclError(f"only one prompt-learning adapter can be active at a time, not {found}")
        return self._prompts[found[0]] if found else None

    def _prompt_rules(self, prompt: PromptAdapter) -> PromptCall:
        """How HF PEFT feeds this prompt adapter: its seq2seq, task-head (SEQ_CLS, TOKEN_CLS, QUESTION_ANS) or
        language-model rules."""
        if self._info.is_encoder_decoder:
            return seq2seq_call
        name = next(n for n, p in self._prompts.items() if p is prompt)
        task = self.book.plans[name].spec.task_type
        if task in HEAD_TASKS:
            return head_rules(task)
        return prompt_call

    def _prompt_site(self, prompt: PromptAdapter) -> PromptSite:
        """The model, ``prompt``, the input word embeddings and their dtype (the virtual tokens take it)."""
        embed = self._embedding()
        return PromptSite(self.model, prompt, embed, embed.weight.dtype)

    def _embedding(self) -> nn.Embedding:
        """The input word embeddings (prompt tuning looks ids up there; their weight sets device and dtype)."""
        module = self._info.word_embeddings
        if module is not None:
            return cast(nn.Embedding, self.model.get_submodule(module))
        getter: Callable[[], nn.Embedding] | None = getattr(self.model, "get_input_embeddings", None)
        if getter is not None:
            return getter()
        raise PeftdeclError(
            f"{type(self.model).__name__} names no input word embeddings (get_input_embeddings()); "
            "prompt-learning adapters need them"
        )
