"""The docs' code-derived parts stay in step with the code: every object the API reference renders exists, and the
IR page's generator covers every registered kind with the tensors its compiled plan really holds."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def resolve(target: str) -> object:
    """Import the longest module prefix of a dotted path, then walk the attributes (as mkdocstrings does)."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found: object = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in parts[cut:]:
            found = getattr(found, attr)
        return found
    raise ImportError(target)


def api_targets() -> list[str]:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    return re.findall(r"^::: ([\w.]+)\s*$", text, flags=re.MULTILINE)


def test_the_api_reference_lists_objects() -> None:
    # a page without ::: blocks would make the next test pass vacuously
    assert len(api_targets()) >= 20


@pytest.mark.parametrize("target", api_targets())
def test_every_api_reference_target_exists(target: str) -> None:
    resolve(target)  # AttributeError / ImportError when a documented name was renamed or removed


def load_gen_ir() -> ModuleType:
    """docs/gen_ir.py, which is a script, not a package module: loaded as mkdocs loads a hook, with docs/ on
    sys.path meanwhile (for its sibling module docs/_page.py)."""
    spec = importlib.util.spec_from_file_location("gen_ir", DOCS / "gen_ir.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_ir"] = module
    sys.path.insert(0, str(DOCS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(DOCS))
    return module


def test_the_ir_page_has_a_section_per_kind_with_its_compiled_tensors() -> None:
    from peftdecl.kinds import kinds

    gen_ir = load_gen_ir()
    text = gen_ir.render_generated()
    cases = gen_ir.examples()
    assert set(cases) == set(kinds())  # no registered kind is left off the page
    for kind, by_layer in cases.items():
        section = text.split(f"\n### {kind}\n", 1)[1].split("\n### ", 1)[0]
        for layer, spec in by_layer.items():
            plan = gen_ir.compile_example(layer, spec)
            for p in [*(p for lp in plan.layers for p in lp.params), *plan.shared]:
                assert f"`{p.name}` | `{gen_ir.value(p.shape)}` | {p.role} |" in section, (
                    kind,
                    layer,
                    p.name,
                )


def test_the_ir_page_documents_every_engine_option_with_its_variable() -> None:
    import dataclasses

    from peftdecl.options import ENV_PREFIX, EngineOptions

    text = load_gen_ir().render_generated()
    for f in dataclasses.fields(EngineOptions):
        assert f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}` |" in text
