"""Every docstring example in the installed package runs and gives what it shows."""
import doctest
import importlib
import pkgutil

import pytest

import refattn

import refattn.analysis
import refattn.gpu

MODULES = sorted({"refattn"} | {m.name for pkg in (refattn, refattn.analysis, refattn.gpu)
                                for m in pkgutil.walk_packages(pkg.__path__,
                                                               prefix=pkg.__name__ + ".")}
                 | {"refattn.gpu", "refattn.analysis"})


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"
