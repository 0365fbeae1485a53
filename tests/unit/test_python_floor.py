"""The package runs on the oldest Python pyproject admits: no regex syntax newer than it (possessive quantifiers
and atomic groups came in 3.11; a pattern using them made ``import ivgr_dist.reward.rules`` fail on 3.10)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "ivgr_dist"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# a quantifier followed by "+" (possessive), or "(?>" (atomic group); escaped characters are skipped
NEWER_SYNTAX = re.compile(r"(?<!\\)(?:\\\\)*(?:[*+?}]\+|\(\?>)")


def _patterns():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(func, "attr", None) == "compile" and node.args:
                if getattr(getattr(func, "value", None), "id", None) == "re":
                    try:
                        yield path.name, node.lineno, ast.literal_eval(node.args[0])
                    except ValueError:
                        continue


def test_regexes_use_no_syntax_newer_than_the_oldest_supported_python():
    floor = re.search(r'requires-python = ">=3\.(\d+)"', PYPROJECT.read_text())
    assert floor, "requires-python not found"
    found = list(_patterns())
    assert len(found) >= 10  # the scan sees the package's patterns
    if int(floor.group(1)) >= 11:
        return
    newer = [(f, line, p) for f, line, p in found if NEWER_SYNTAX.search(p)]
    assert not newer, f"Python 3.11+ regex syntax in a package that admits 3.{floor.group(1)}: {newer}"
