"""Lazy exports: the names a package promises load on first use, and only then."""

from __future__ import annotations

import subprocess
import sys

import pytest

from msam._lazy import lazy_exports


def test_a_name_loads_on_first_use_and_stays():
    namespace = {"__name__": "pkg", "__all__": ["dumps", "nothing"]}
    getattr_, dir_ = lazy_exports(namespace, {"dumps": "json"})
    assert "dumps" not in namespace
    import json

    assert getattr_("dumps") is json.dumps
    assert namespace["dumps"] is json.dumps
    assert {"dumps", "nothing"} <= set(dir_())
    with pytest.raises(AttributeError, match="module 'pkg' has no attribute 'nothing'"):
        getattr_("nothing")


def test_msam_packages_import_without_torch_until_asked():
    code = (
        "import sys, msam, msam.optim, msam.bench\n"
        "assert 'torch' not in sys.modules\n"
        "assert msam.optim.grad_evals_per_update('sam', 0.05) == 2\n"
        "assert 'torch' not in sys.modules\n"
        "msam.SAM\n"
        "assert 'torch' in sys.modules and msam.SAM is msam.optim.SAM\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
