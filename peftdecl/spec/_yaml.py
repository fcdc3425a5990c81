"""A bounded YAML reader for specs: JSON-compatible values only, with alias expansion counted before building.

PyYAML's safe loader still builds ``set``, ``bytes`` and ``datetime`` values (``!!set``, ``!!binary``, unquoted
dates), follows recursive aliases, and expands a "billion laughs" document into 10^8 values. Here:

- nodes nest at most ``MAX_DEPTH`` levels (checked while composing, so Python's recursion limit is never hit);
- the composed node graph is walked once, sharing-aware, and refused if an alias refers to itself or if the
  fully expanded document would hold more than ``MAX_NODES`` values; only then are Python objects built;
- ``!!binary``, ``!!set``, ``!!omap``, ``!!pairs``, ``!!timestamp`` and every non-core tag are refused;
- unquoted dates stay strings (as in YAML 1.2's core schema) instead of becoming ``datetime.date``.
"""

from __future__ import annotations

from typing import Any

import yaml

from peftdecl.errors import SpecError
from peftdecl.spec.limits import MAX_DEPTH, MAX_NODES

_REFUSED_TAGS = ("binary", "set", "omap", "pairs", "timestamp")


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with a nesting bound while composing and JSON-only constructors."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _RefusedError(f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _RefusedError(Exception):
    """Raised inside the loader; turned into a SpecError naming the source."""


def _refuse(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise _RefusedError(
        f"YAML tag {node.tag!r} (line {node.start_mark.line + 1}) is not allowed in a spec; "
        "use plain strings, numbers, booleans, null, lists and mappings"
    )


for _tag in _REFUSED_TAGS:
    _BoundedLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse)
_BoundedLoader.add_constructor(None, _refuse)


def expanded_size(root: yaml.Node) -> int:
    """Number of values the node graph expands to (aliases counted at every use); raises on a cycle or when the
    count passes ``MAX_NODES``. Iterative and memoised, so a billion-laughs graph is counted in O(nodes)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            open_nodes.discard(key)
            total = 1 + sum(sizes[id(child)] for child in children)
            if total > MAX_NODES:
                raise _RefusedError(f"expands to more than {MAX_NODES} values (YAML aliases)")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise _RefusedError(f"recursive YAML alias (line {node.start_mark.line + 1})")
        open_nodes.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise _RefusedError(f"recursive YAML alias (line {child.start_mark.line + 1})")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_yaml(text: str, origin: str | None) -> Any:
    """Parse one YAML document within the bounds above; every failure is a SpecError naming ``origin``."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader already refuses control characters such as NUL
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        return loader.construct_document(node)
    except _RefusedError as exc:
        raise SpecError([("$", f"not a valid spec: {exc}")], origin) from None
    except yaml.YAMLError as exc:
        raise SpecError([("$", f"not valid YAML: {_one_line(exc)}")], origin) from None
    except (ValueError, TypeError, RecursionError) as exc:
        # int() past Python's 4300-digit limit, an unhashable key, ...: all faults of the document
        raise SpecError([("$", f"not valid YAML: {type(exc).__name__}: {str(exc)[:200]}")], origin) from None
    finally:
        if loader is not None:
            loader.dispose()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
