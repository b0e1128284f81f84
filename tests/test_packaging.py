"""How backprop is put together as a package: what a checkout that was never installed says."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_an_uninstalled_checkout_says_how_to_install_it(tmp_path):
    for folder in ("backprop", "kernels"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    # the copy, as Python sees a fresh clone: this environment's editable-install finder
    # (which maps backprop.kernels to this repository's kernels/) is taken out
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "import backprop\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: backprop is imported from")
    assert f"pip install -e {tmp_path}" in last
