"""The config package's face (sparsefast/config/__init__.py): importing any of it imports no torch (the CLI parsers
read their choices and defaults from it), and it exports every config the README and the callers use."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["sparsefast.config", "sparsefast.config.prune", "sparsefast.config.structural",
                                    "sparsefast.config.recover"])
def test_import_imports_no_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_the_face_exports_every_config():
    import sparsefast.config as config
    from sparsefast.config import prune, recover, structural
    from sparsefast.prune.structural import StructuralConfig
    from sparsefast.recover import RecoverConfig

    assert config.WandaConfig is prune.WandaConfig and config.make_config is prune.make_config
    assert config.METHODS == ("magnitude", "wanda", "sparsegpt", "ria") == tuple(config.CONFIGS)
    assert config.RIAConfig is prune.RIAConfig
    assert config.StructuralConfig is structural.StructuralConfig is StructuralConfig
    assert config.RecoverConfig is recover.RecoverConfig is RecoverConfig
    assert set(config.__all__) <= set(dir(config))
