"""Griffe extension for the API reference: the docstrings' Sphinx roles (``:class:`X```, ``:func:`~m.f```)
become Markdown code spans, since mkdocstrings renders docstrings as Markdown and would print the role verbatim.

Listed under the mkdocstrings handler's ``extensions`` in mkdocs.yml.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :role:`target` or :role:`~pkg.mod.target` (the tilde shows the last component only, as Sphinx does)
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")


def _code_span(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite the roles in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code_span, obj.docstring.value)
