"""mixed_precision.py (backprop's bf16 mixed-precision step against PyTorch's autocast) end
to end in smoke mode: with every product forced to bf16, so the bf16 path really runs on
small shapes; with MKL made unloadable, where the mode must fall back to float32 and the
report must say so; and the PyTorch variants where PyTorch is installed (skipped with the
reason otherwise). Plain tests: they run with ``--benchmark-disable`` and are skipped by
``--benchmark-only``."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _run(tmp_path, env_extra=None, *extra):
    env = dict(os.environ)
    for var in ("BACKPROP_LOWP_MIN_MACS", "BACKPROP_LOWP_MIN_INNER", "BACKPROP_BF16_GEMM",
                "BACKPROP_MKL_RT", "BACKPROP_LOWP_EMULATE", "BACKPROP_PRECISION"):
        env.pop(var, None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, str(HERE / "mixed_precision.py"), "--smoke",
                           "--threads", "1", "--models", "tiny,mnist", "--out-dir",
                           str(tmp_path), *extra], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "mixed_precision.json").read_text())
    md = (tmp_path / "mixed_precision.md").read_text()
    return proc, data, md


def _bf16_fast() -> bool:
    from backprop import bf16

    return bool(bf16.bf16_support()["fast"])


def test_mixed_precision_smoke_every_product_bf16(tmp_path):
    # thresholds 0 and 1: the smoke shapes are far below the defaults, and the bf16 path
    # (products, fused bf16 epilogues, Adam writing the bf16 weights) must run here
    _, data, md = _run(tmp_path, {"BACKPROP_LOWP_MIN_MACS": "0",
                                  "BACKPROP_LOWP_MIN_INNER": "1"})
    section = data["sections"]["1"]
    assert set(section["models"]) == {"tiny", "mnist"}
    expected = {"bp-f32", "bp-bf16", "bp-bf16-region"} | (
        {"torch-f32", "torch-autocast"} if HAVE_TORCH else set())
    for model in section["models"].values():
        assert set(model["variants"]) == expected
        assert all(v["median"] > 0 for v in model["variants"].values())
        plan = model["plan"]
        if _bf16_fast():
            assert plan["bf16"] == plan["total"] > 0 and model["fallback"] is None
    assert all(row["ok"] for row in data["sanity"]), data["sanity"]
    assert md.startswith("# bf16 mixed precision") and "SMOKE RUN" in md
    assert "python benchmarks/mixed_precision.py" in md and "## 1 thread" in md
    assert "`BACKPROP_LOWP_MIN_MACS=0`" in md
    assert len(section["goals"]) == 9


def test_mixed_precision_smoke_without_fast_bf16(tmp_path):
    # an MKL that cannot be loaded: bf16 is not fast, the mode trains in float32 with a
    # warning, and the benchmark still runs and says so
    _, data, md = _run(tmp_path, {"BACKPROP_MKL_RT": str(tmp_path / "no-libmkl_rt.so")},
                       "--frameworks", "backprop")
    assert data["bf16"]["fast"] is False
    for model in data["sections"]["1"]["models"].values():
        assert model["fallback"] and model["plan"]["bf16"] == 0
        losses = next(r for r in data["sanity"] if r["model"] in data["sections"]["1"]
                      ["models"])["losses"]
        assert losses["bp-bf16"] == losses["bp-f32"]  # float32 steps, bit for bit
    assert "bf16 is not fast here" in md and "fell back to float32" in md


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed: the PyTorch variants "
                    "of mixed_precision.py are not exercised (pip install torch)")
def test_mixed_precision_torch_losses_match_backprop(tmp_path):
    _, data, _ = _run(tmp_path, None, "--models", "tiny")
    row = data["sanity"][0]
    assert row["checks"]["torch-f32 vs bp-f32"]["ok"]
    assert row["checks"]["torch-autocast vs torch-f32"]["ok"]
