"""Every hook is documented (docstring, docs/plugins.md) and tested (named in a test file).

Adding a hookspec without documenting it in docs/plugins.md, or without a test under
tests/ that names it, makes this fail.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from kproxy import hookspecs

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "plugins.md"
HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if name.startswith("kproxy_") and callable(fn) and hasattr(fn, "kproxy_spec"))


def test_hooks_are_found():
    assert {"kproxy_configure", "kproxy_pre_render", "kproxy_render_chain", "kproxy_post_apply"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hookspec_has_a_docstring(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc) >= 120, f"hookspec {hook} needs a docstring saying when it is called, with what, and what it returns"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_heading_in_the_guide(hook):
    headings = re.findall(r"^#{2,4}\s+`?(\w+)", GUIDE.read_text(), re.M)
    assert hook in headings, f"docs/plugins.md has no heading for {hook}"


def test_guide_documents_no_hook_that_does_not_exist():
    documented = set(re.findall(r"^#{2,4}\s+`?(kproxy_\w+)", GUIDE.read_text(), re.M))
    assert documented <= set(HOOKS), documented - set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_named_in_a_test(hook):
    this = Path(__file__).resolve()
    files = [p for p in (ROOT / "tests").rglob("test_*.py") if p.resolve() != this]
    assert any(hook in p.read_text() for p in files), f"no test under tests/ uses {hook}"
