"""The NumPy engine's access to prefix and prompt tuning tables (the math is in :mod:`peftdecl_numpy.kinds.prompt`):
the table P, prefix tuning's per-layer (K, V) and dL/dparams from dL/dP, for the one prompt-learning adapter."""

from __future__ import annotations

from collections.abc import Callable

from peftdecl.adapter_book import AdapterBook
from peftdecl.errors import PeftdeclError
from peftdecl.plan import Plan, PromptPlan
from peftdecl_numpy.xp_ops import Array, Namespace


class PromptLearning:
    """Mixed into :class:`~peftdecl_numpy.engine.NumpyEngine`, which holds the book, the namespace and the tensors."""

    book: AdapterBook
    xp: Namespace
    _params: dict[str, dict[str, dict[str, Array]]]

    _asarray: Callable[..., Array]

    def prompt_table(self, name: str | None = None) -> Array:
        """The virtual-token table P: prompt tuning [T·S, d], prepended to the input embeddings by
        ``kinds.prompt.prepend_virtual_tokens``; prefix tuning [T, 2L·d] (through the projection MLP when the
        adapter trains one)."""
        from peftdecl_numpy.kinds import prompt

        _, pp, params = self._prompt_adapter(name)
        return self.xp.asarray(prompt.table(pp, params)[0], copy=True)

    def prefix_key_values(self, batch_size: int, name: str | None = None) -> list[tuple[Array, ...]]:
        """Per decoder layer the prefix (K, V), each (batch, heads, T, head_dim), as PEFT's ``get_prompt``."""
        from peftdecl_numpy.kinds import prompt

        plan, pp, params = self._prompt_adapter(name)
        if plan.kind != "prefix_tuning":
            raise PeftdeclError(f"adapter is {plan.kind}; only prefix tuning has key/value prefixes")
        return prompt.key_values(pp, prompt.table(pp, params)[0], batch_size)

    def prompt_backward(self, d_table: Array, name: str | None = None) -> dict[str, Array]:
        """Gradients of the adapter's trainable tensors (by key) from dL/dP (for dL/dKV see kinds.prompt)."""
        from peftdecl_numpy.kinds import prompt

        _, pp, params = self._prompt_adapter(name)
        _, cache = prompt.table(pp, params)
        return prompt.table_backward(pp, params, cache, self._asarray(d_table, copy=False))

    def _prompt_adapter(self, name: str | None) -> tuple[Plan, PromptPlan, dict[str, Array]]:
        plans = self.book.plans
        names = [name] if name is not None else [n for n in self.book.active if plans[n].prompt is not None]
        if len(names) != 1 or names[0] not in plans or plans[names[0]].prompt is None:
            found = sorted(n for n, p in plans.items() if p.prompt is not None)
            raise PeftdeclError(f"name one prompt-learning adapter (attached: {found}); got {name!r}")
        plan = plans[names[0]]
        assert plan.prompt is not None
        return plan, plan.prompt, self._params[names[0]][""]
