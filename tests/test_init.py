"""The package face (sparsefast/__init__.py): `sparsefast.load` / `sparsefast.prune` resolve to sparsefast.api on
first use, importing the package imports no torch, and the function `sparsefast.prune` survives an import of the
subpackage `sparsefast.prune`."""

from __future__ import annotations

import subprocess
import sys


def _fresh(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_import_is_light():
    assert _fresh("import sys, sparsefast; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))") \
        == "[]"


def test_public_functions_are_the_api_functions():
    import sparsefast
    import sparsefast.api
    import sparsefast.prune.wanda  # noqa: F401  (the subpackage must not replace the function)

    assert sparsefast.load is sparsefast.api.load
    assert sparsefast.prune is sparsefast.api.prune
    assert callable(sparsefast.prune)


def test_subpackage_imported_first_keeps_the_function():
    out = _fresh("import sys, sparsefast.prune.wanda, sparsefast.api as a; "
                 "print(sparsefast.prune is a.prune, 'sparsefast.prune' in sys.modules)")
    assert out == "True True"


def test_unknown_attribute_is_an_attribute_error():
    import pytest

    import sparsefast

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sparsefast.nope
