"""frameworks.py (backprop against jax.jit, PyTorch and ONNX Runtime) end to end in smoke
mode, with whichever of those frameworks are installed (backprop always), its clean skip of
a missing one, and its HLO summary on a hand-written module. Plain tests: they run with
``--benchmark-disable`` and are skipped by ``--benchmark-only``."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _installed(*modules) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _run(tmp_path, *extra):
    proc = subprocess.run([sys.executable, str(HERE / "frameworks.py"), "--smoke",
                           "--threads", "1", "--out-dir", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_frameworks_smoke(tmp_path):
    _run(tmp_path)
    expected = {"backprop-loop", "backprop-fit"} | ({"torch"} if _installed("torch") else set()) \
        | ({"jax"} if _installed("jax", "optax") else set())
    train = json.loads((tmp_path / "frameworks.json").read_text())
    assert {r["framework"] for r in train["results"]} == expected
    assert {r["model"] for r in train["results"]} == {"tiny", "mnist", "wide", "b1024"}
    assert all(r["median"] > 0 and r["info"]["threads"] == 1 for r in train["results"])
    assert all("step_over_floor" in r for r in train["results"] if r["model"] in ("mnist",
                                                                                  "wide"))
    md = (tmp_path / "frameworks.md").read_text()
    assert md.startswith("# Training step") and "python benchmarks/frameworks.py" in md
    assert "## Goals (issue 20)" in md and "Load average" in md
    inference = json.loads((tmp_path / "inference.json").read_text())
    variants = {(r["framework"], r["variant"]) for r in inference["results"]}
    assert {("backprop", v) for v in ("predict", "call", "forward-eval",
                                      "forward-inference_mode", "frozen")} <= variants
    if _installed("onnxruntime", "onnx"):
        assert ("onnxruntime", "session.run") in variants
    memory = json.loads((tmp_path / "memory.json").read_text())
    assert {r["framework"] for r in memory["results"]} == expected
    assert all(r["after_steps"]["ru_maxrss_mib"] >= r["after_setup"]["ru_maxrss_mib"] > 0
               for r in memory["results"])
    profile = json.loads((tmp_path / "profile.json").read_text())
    bp = [r for r in profile["results"] if r["framework"] == "backprop"]
    assert {r["model"] for r in bp} == {"mnist", "wide"}
    assert all(any(op["op"] == "matmul" for op in r["ops"]) and r["step_over_floor"] > 0
               for r in bp)
    if "jax" in expected:
        assert (tmp_path / "xla_hlo_mnist.txt").read_text().startswith("HloModule")
        jx = [r for r in profile["results"] if r["framework"] == "jax"]
        assert all(r["hlo"]["fusions"] > 0 and len(r["hlo"]["gemms"]) == 8 for r in jx)
    assert "## mnist" in (tmp_path / "profile.md").read_text()


def test_frameworks_skips_a_missing_framework(tmp_path):
    proc = _run(tmp_path, "--sections", "train", "--models", "tiny", "--frameworks",
                "backprop-loop,jax", "--pretend-missing", "jax")
    assert "jax, optax not installed: jax skipped" in proc.stdout
    data = json.loads((tmp_path / "frameworks.json").read_text())
    assert [r["framework"] for r in data["results"]] == ["backprop-loop"]
    assert "Skipped: jax, optax not installed" in (tmp_path / "frameworks.md").read_text()


def test_same_data_as_the_suite():
    from frameworks import Spec, batch_data
    from workloads import MLPS, mlp_data

    for mlp in MLPS.values():
        for a, b in zip(batch_data(Spec.of(mlp)), mlp_data(mlp, np)):
            np.testing.assert_array_equal(a, b)


HLO = """HloModule jit_step, entry_computation_layout={()}

%fused_computation (param_0: f32[4,8], param_1: f32[8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8]{0} parameter(1)
  %broadcast.1 = f32[4,8]{1,0} broadcast(%param_1), dimensions={1}
  %add.1 = f32[4,8]{1,0} add(%param_0, %broadcast.1)
  %constant.1 = f32[] constant(0)
  %broadcast.2 = f32[4,8]{1,0} broadcast(%constant.1), dimensions={}
  ROOT %maximum.1 = f32[4,8]{1,0} maximum(%add.1, %broadcast.2), metadata={op_name="jit(step)/jvp()/max"}
}

%fused_computation.1 (param_0.1: f32[4,16], param_1.1: f32[8,16]) -> f32[4,8] {
  %param_0.1 = f32[4,16]{1,0} parameter(0)
  %param_1.1 = f32[8,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,8]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}

ENTRY %main (x: f32[4,16], w: f32[8,16], b: f32[8], d: f32[4,8]) -> (f32[4,8], f32[8,16]) {
  %x = f32[4,16]{1,0} parameter(0)
  %w = f32[8,16]{1,0} parameter(1)
  %b = f32[8]{0} parameter(2)
  %d = f32[4,8]{1,0} parameter(3)
  %ynn_fusion = f32[4,8]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(step)/jvp()/dot_general"}, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %add_maximum_fusion = f32[4,8]{1,0} fusion(%ynn_fusion, %b), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(step)/jvp()/max"}
  %dot.2 = f32[8,16]{1,0} dot(%d, %x), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}
  ROOT %tuple = (f32[4,8]{1,0}, f32[8,16]{1,0}) tuple(%add_maximum_fusion, %dot.2)
}
"""


def test_hlo_summary():
    from step_profile import summarize_hlo

    summary = summarize_hlo(HLO)
    assert summary["ops"] == 3 and summary["fusions"] == 2
    assert summary["by_kind"] == {"kCustom(ynn)": 1, "kLoop": 1, "dot": 1}
    assert [(g["name"], g["gemm"], g["fused_with_gemm"]) for g in summary["gemms"]] == [
        ("ynn_fusion", ["4x8 k=16"], []), ("dot.2", ["8x16 k=4"], [])]
    forward = summary["by_category"]["forward"]
    assert forward["ops"] == 1 and forward["fused"] == ["add", "broadcast", "maximum"]
