"""The docs as text: the module map in docs/ARCHITECTURE.md names every module of clm/. Plain
text checks, no runs."""

from __future__ import annotations

import re

from conftest import ROOT


def test_the_module_map_names_every_module_of_clm():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"^\| `([\w/]+\.py)`", text, re.M))
    unnamed = {"__init__.py", "aot/__main__.py"}  # empty; named in aot/__init__.py's line
    clm = ROOT / "clm"
    modules = {str(path.relative_to(clm)) for path in clm.rglob("*.py")} - unnamed
    missing = sorted(modules - named)
    assert not missing, f"docs/ARCHITECTURE.md has no line for {missing}: add one per module"
    gone = sorted(named - modules)
    assert not gone, f"docs/ARCHITECTURE.md names modules that no longer exist: {gone}"
