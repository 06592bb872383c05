"""Every docstring example in ``src/prunescope`` runs (issue #18): an example a reader copies must work."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import prunescope

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# in flight during session 15, re-enable (their examples passed when this test was written; other helpers were
# editing these files, so a broken example there is theirs to fix after the merge)
IN_FLIGHT: set[str] = set()  # modules whose examples are not run yet (none)


def _modules_with_examples() -> list[str]:
    names = ["prunescope"] + [m.name for m in pkgutil.walk_packages(prunescope.__path__, "prunescope.")]
    finder = doctest.DocTestFinder()
    return [n for n in names if any(t.examples for t in finder.find(importlib.import_module(n)))]


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    """The collection sees the modules whose docstrings have examples (a broken collection would pass every
    module below by finding none)."""
    assert len(MODULES) >= 25
    assert {"prunescope.graph", "prunescope.topology", "prunescope.masks.pruners",
            "prunescope.sensitivity.analysis"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    if name in IN_FLIGHT:
        pytest.skip("in flight during session 15, re-enable")
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=FLAGS, report=True, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} fail (see above)"
