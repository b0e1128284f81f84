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


def test_every_class_the_readme_lists_is_a_top_level_name():
    """The README's table of contents of the library names classes bare (``StepLR``,
    ``EarlyStopping``): each one is ``bp.<name>``."""
    import re
    from pathlib import Path

    import backprop as bp

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    box = readme.split("## What is in the box", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`(?:bp\.)?([A-Z][A-Za-z0-9]*)[(`]", box))
    assert len(names) > 30, names  # the table was found
    assert sorted(n for n in names if not hasattr(bp, n)) == []
