"""The tools around the suite: the report's arithmetic on a hand-made result file, and
torch_compare.py end to end in smoke mode (or its clean skip without PyTorch).
Plain tests: they run with ``--benchmark-disable`` and are skipped by ``--benchmark-only``."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import report as bench

HERE = Path(__file__).resolve().parent


def _bench(name, group, median, **info):
    return {"name": name, "group": group, "extra_info": info,
            "stats": {"median": median, "min": median * 0.9, "mean": median * 1.1, "rounds": 5}}


def _results(tmp_path: Path) -> Path:
    step_info = dict(model="mnist", sizes=[784, 256, 256, 10], batch=128, params=269322,
                     epilogue_bytes=4_000_000, optimizer_bytes=6_000_000, flops=10**9)
    data = {"machine_info": {"backprop": {"cpu": "Test CPU", "usable_cpus": 2}},
            "benchmarks": [
                _bench("copy", "copy:64MB", 0.01, kind="copy", device="cpu",
                       method="numpy_copyto", bytes=200_000_000),  # 20 GB/s
                _bench("copy_plain", "copy:64MB", 0.016, kind="copy", device="cpu",
                       method="numba_plain_stores", bytes=200_000_000),  # 12.5 GB/s
                _bench("k_ref", "kernel:adam_step:6M", 0.02, kind="kernel", device="cpu",
                       backend="reference", op="adam_step", shape=[6_000_000],
                       bytes=168_000_000, flops=78_000_000),
                _bench("k_fused", "kernel:adam_step:6M", 0.01, kind="kernel", device="cpu",
                       backend="numba_cpu", op="adam_step", shape=[6_000_000],
                       bytes=168_000_000, flops=78_000_000),
                _bench("floor", "step:mnist", 0.002, kind="matmul_floor", device="cpu",
                       backend="blas", **step_info),
                _bench("step_ref", "step:mnist", 0.008, kind="step", device="cpu",
                       backend="reference", **step_info),
                _bench("step", "step:mnist", 0.004, kind="step", device="cpu",
                       backend="numba_cpu", interleaved={"step": 0.0036, "matmul_floor": 0.0013},
                       **step_info),
                _bench("copy_gpu", "copy:64MB", 0.0002, kind="copy", device="cuda",
                       method="cupy_copyto", bytes=200_000_000),  # 1 TB/s
                _bench("k_gpu", "kernel:adam_step:6M", 0.001, kind="kernel", device="cuda",
                       backend="cupy", op="adam_step", shape=[6_000_000],
                       bytes=168_000_000, flops=78_000_000),
                _bench("step_gpu", "step:mnist", 0.001, kind="step", device="cuda",
                       backend="cupy", **step_info)]}
    (tmp_path / "benchmark.json").write_text(json.dumps(data))
    torch = {"results": [
        {"framework": "torch", "device": "cpu", "model": "mnist", "median": 0.002, "min": 0.002},
        {"framework": "backprop", "device": "cpu", "model": "mnist", "median": 0.003,
         "min": 0.003}]}
    (tmp_path / "torch.json").write_text(json.dumps(torch))
    return tmp_path


def test_report_derives_bandwidth_floor_and_ratios(tmp_path):
    results = _results(tmp_path)
    rows, machine = bench.load_benchmarks(results / "benchmark.json")
    assert machine["cpu"] == "Test CPU"
    assert bench.copy_bandwidths(rows) == {"cpu": pytest.approx(20e9), "cuda": pytest.approx(1e12)}
    # floor = 2 ms of matmuls + 10 MB at 20 GB/s = 2.5 ms
    assert bench.step_floors(rows, {"cpu": 20e9}) == {("cpu", "mnist"): pytest.approx(0.0025)}
    assert bench.main([str(results), "--no-plot"]) == 0
    md = (results / "report.md").read_text()
    step_row = next(line for line in md.splitlines() if "cpu/numba_cpu" in line and "mnist" in line)
    cells = [c.strip() for c in step_row.strip("|").split("|")]
    # step 4.00 ms, floor 2.50 ms; step/floor from the alternated timings: 3.6 ms over
    # 1.3 ms + 10 MB at 20 GB/s = 2.00×; 2× faster than reference, 1.5× torch
    assert cells[4:10] == ["4.00", "32,000", "2.50", "2.00×", "2.00×", "–"]
    ref_row = next(line for line in md.splitlines() if "cpu/reference" in line and "mnist" in line)
    # no alternated timings: the two benchmarks' medians, 8 ms / 2.5 ms
    assert [c.strip() for c in ref_row.strip("|").split("|")][7] == "3.20×"
    assert cells[10:] == ["2.00", "1.50×"]
    kernel_row = next(line for line in md.splitlines() if "adam_step:6M | cpu/numba_cpu" in line)
    # 168 MB in 10 ms = 16.8 GB/s = 84% of 20 GB/s and 134% of the 12.5 GB/s plain-store
    # copy, 7.8 GFLOP/s, 2× the reference
    assert [c.strip() for c in kernel_row.strip("|").split("|")][3:] == \
        ["16.8", "84%", "134%", "7.8", "2.00×", "–"]
    gpu_kernel = next(line for line in md.splitlines() if "adam_step:6M | cuda/cupy" in line)
    # 168 GB/s is 17% of the GPU's 1 TB/s copy; 10× the best CPU time (10 ms)
    assert [c.strip() for c in gpu_kernel.strip("|").split("|")][3:] == \
        ["168.0", "17%", "–", "78.0", "–", "10.00×"]
    gpu_step = next(line for line in md.splitlines() if "cuda/cupy" in line and "mnist" in line)
    assert [c.strip() for c in gpu_step.strip("|").split("|")][9] == "4.00×"


def test_report_of_split_runs_equals_the_report_of_one(tmp_path):
    """ci/gpu.sh times the GPU and the CPU in two runs (two JSON files): same report."""
    whole = tmp_path / "whole"
    whole.mkdir()
    _results(whole)
    data = json.loads((whole / "benchmark.json").read_text())
    split = tmp_path / "split"
    split.mkdir()
    for device in ("cuda", "cpu"):
        part = dict(data, benchmarks=[b for b in data["benchmarks"]
                                      if b["extra_info"]["device"] == device])
        (split / f"benchmark-{device}.json").write_text(json.dumps(part))
    (split / "torch.json").write_text((whole / "torch.json").read_text())
    assert bench.main([str(whole), "--no-plot"]) == 0
    assert bench.main([str(split), "--no-plot"]) == 0
    assert (split / "report.md").read_text() == (whole / "report.md").read_text()


def test_report_chart_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    results = _results(tmp_path)
    assert bench.main([str(results)]) == 0
    png = (results / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "![benchmark chart](report.png)" in (results / "report.md").read_text()


def test_report_without_results_says_how_to_get_them(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path)])
    assert "ci/bench.sh" in capsys.readouterr().err


def test_torch_compare_smoke(tmp_path):
    out = tmp_path / "torch.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "torch_compare.py"), "--smoke", "--devices", "cpu",
         "--models", "tiny", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if importlib.util.find_spec("torch") is None:
        assert "PyTorch is not installed" in proc.stdout
        pytest.skip("PyTorch is not installed: torch_compare.py skipped cleanly")
    data = json.loads(out.read_text())
    assert {(r["framework"], r["model"]) for r in data["results"]} == \
        {("torch", "tiny"), ("backprop", "tiny")}
    assert all(r["threads"] == 1 and r["median"] > 0 for r in data["results"])
    rows = {r["framework"]: r for r in data["results"]}
    # PyTorch runs under its own default policy and under "active" (the best counts), never
    # under the OpenMP settings that importing backprop makes for Numba
    assert set(rows["torch"]["median_by_wait_policy"]) == {"default", "active"}
    assert rows["torch"]["omp_wait_policy_seen"] == rows["torch"]["omp_wait_policy"]
    assert set(rows["torch"]["omp_settings_seen"]) <= {"OMP_WAIT_POLICY"}
    assert rows["backprop"]["omp_settings_seen"] == {"GOMP_SPINCOUNT": "30000",
                                                     "KMP_BLOCKTIME": "0"}


@pytest.mark.parametrize("op", ["bias_act_backward", "softmax_forward", "batchnorm_backward"])
def test_in_place_case_overwrites_its_input_and_reset_restores_it(op):
    """An in-place kernel case passes its input as the output, and its ``reset`` puts the
    input back, so that every timed call starts from the same values."""
    import numpy as np

    from backprop import kernels as K
    from workloads import IN_PLACE, kernel_case

    variant = "sigmoid" if op == "bias_act_backward" else ""
    case = kernel_case(op, variant, "small", np, smoke=True, in_place=True)
    out, source = IN_PLACE[op]
    assert case.args[out] is case.args[source] and case.name.endswith("in place]")
    before = case.args[source].copy()
    K.implementation("reference", op)(*case.args)
    assert not np.array_equal(case.args[source], before)
    case.reset()
    np.testing.assert_array_equal(case.args[source], before)


def test_in_place_variants_are_the_layers_calls():
    """Dense runs every backward epilogue in place (δ over dA) and a forward epilogue in
    place only where σ' needs A alone (GELU keeps Z and writes A to a second buffer)."""
    from workloads import kernel_variants

    in_place = {(op, v) for op, v, place in kernel_variants() if place}
    for act in ("relu", "sigmoid", "gelu_tanh", "gelu_erf"):
        assert ("bias_act_backward", act) in in_place
        assert (("bias_act_forward", act) in in_place) == act.startswith(("relu", "sigmoid"))


def test_inference_paths_smoke(tmp_path):
    """inference_paths.py end to end on small batches: every variant computes the normal
    path's outputs (the script asserts it), and the report has a row per model and batch
    with a blank where predict does not take the plan."""
    from backprop import inference

    proc = subprocess.run([sys.executable, str(HERE / "inference_paths.py"), "--smoke",
                           "--batches", "1,64,150,1100", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "inference_paths.json").read_text())
    assert [(r["model"], r["batch"]) for r in rows] == [
        (m, b) for m in ("digits", "mnist") for b in (1, 64, 150, 1100)]
    by = {(r["model"], r["batch"]): r["us"] for r in rows}
    assert "predict's plan" in by[("digits", 1100)]  # small weights: any batch
    assert "lanes form" in by[("digits", 1100)]  # packed from PACKED_MIN_ROWS on
    assert inference.PACKED_MIN_ROWS > 150 and "lanes form" not in by[("digits", 150)]
    # 1 MiB of weights: any batch where they fit in a core's L2, else up to 128 rows
    fits = 1_075_200 <= inference.l2_cache_bytes()
    assert ("predict's plan" in by[("mnist", 150)]) == fits
    assert ("lanes form" in by[("mnist", 1100)]) == fits
    assert "plan, one thread" in by[("mnist", 64)]
    md = (tmp_path / "inference_paths.md").read_text()
    assert md.startswith("# Inference paths")
    assert ("| mnist | 1,050 KiB | 1100 |  |" in md) != fits


def test_parameter_layout_smoke(tmp_path):
    """parameter_layout.py end to end: the three variants give the same bits (the script
    asserts it); the optimizer's aligned buffer puts every parameter on a cache line, back
    to back puts the odd model's later weights off one, and the mnist MLP's nowhere."""
    proc = subprocess.run([sys.executable, str(HERE / "parameter_layout.py"), "--smoke",
                           "--batches", "1", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "parameter_layout.json").read_text())
    assert [(r["model"], r["batch"]) for r in rows] == [("odd", 1), ("mnist", 1)]
    odd, mnist = rows
    for r in rows:
        assert set(r["offsets"]["aligned buffer"]) == {0} == set(r["offsets"]["no optimizer"])
        assert len(r["rounds"]["back to back"]) == 3 and r["us"]["back to back"] > 0
    assert odd["offsets"]["back to back"][2:] == [52] * 6  # after the 45 floats of a bias
    assert set(mnist["offsets"]["back to back"]) == {0}
    assert (tmp_path / "parameter_layout.md").read_text().startswith("# Parameter layout")


def test_workers_clear_every_openmp_setting_backprop_makes():
    """The benchmark scripts clear backprop's OpenMP settings before PyTorch imports:
    their copies of the list must be backprop's."""
    import frameworks
    import torch_compare

    from backprop import kernels

    assert frameworks.OMP_VARIABLES == kernels.OMP_VARIABLES
    assert torch_compare.OMP_VARIABLES == kernels.OMP_VARIABLES


def test_paired_slices_smoke(tmp_path):
    """paired_slices.py end to end with backprop's two variants (no other framework needed):
    every round has a slice of each, and the ratios come from the same rounds."""
    proc = subprocess.run([sys.executable, str(HERE / "paired_slices.py"), "--smoke",
                           "--frameworks", "backprop-loop,backprop-fit", "--models", "tiny",
                           "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "paired_slices.json").read_text())
    (result,) = data["results"]
    assert result["model"] == "tiny"
    assert {fw: len(ms) for fw, ms in result["slices_ms"].items()} == \
        {"backprop-loop": 2, "backprop-fit": 2}
    assert all(t > 0 for ms in result["slices_ms"].values() for t in ms)
    ratio = result["ratios"]["backprop-fit"]
    per_round = [f / b for f, b in zip(result["slices_ms"]["backprop-fit"],
                                       result["slices_ms"]["backprop-loop"])]
    assert ratio["rounds"] == 2 and min(per_round) <= ratio["median"] <= max(per_round)
    md = (tmp_path / "paired_slices.md").read_text()
    assert md.startswith("# Training step: ratios from interleaved time slices")
    assert "| tiny |" in md


def test_paired_slices_modes_and_baseline(tmp_path):
    """A worker named ``backprop-loop+adaptive`` runs under ``BACKPROP_THREADS=adaptive``
    (its ratio to the fixed loop comes from the same rounds); ``--baseline`` picks the
    framework the ratios divide by, and an unknown one is refused before any worker starts."""
    proc = subprocess.run([sys.executable, str(HERE / "paired_slices.py"), "--smoke",
                           "--frameworks", "backprop-loop,backprop-loop+adaptive", "--models",
                           "tiny", "--baseline", "backprop-loop+adaptive",
                           "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "paired_slices.json").read_text())
    assert data["baseline"] == "backprop-loop+adaptive"
    (result,) = data["results"]
    assert set(result["ratios"]) == {"backprop-loop"}
    assert "| backprop-loop / backprop-loop+adaptive |" in \
        (tmp_path / "paired_slices.md").read_text()
    bad = subprocess.run([sys.executable, str(HERE / "paired_slices.py"), "--models", "tiny",
                          "--baseline", "jaxx", "--frameworks", "backprop-loop+often",
                          "--out-dir", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and \
        "unknown frameworks ['backprop-loop+often', 'jaxx']" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_paired_slices_inference_smoke(tmp_path):
    """--inference: one predict call per step on model:rows cases, two rounds each, for
    ``predict`` and a frozen model's (``backprop+frozen``); a bad case or mode is refused
    before any worker starts."""
    proc = subprocess.run([sys.executable, str(HERE / "paired_slices.py"), "--smoke",
                           "--inference", "--frameworks", "backprop,backprop+frozen",
                           "--models", "digits:1,mnist:3", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "paired_inference.json").read_text())
    assert data["inference"] is True
    assert [(r["model"], r["batch"]) for r in data["results"]] == [("digits", 1), ("mnist", 3)]
    assert all(len(r["slices_ms"][fw]) == 2 and min(r["slices_ms"][fw]) > 0
               for r in data["results"] for fw in ("backprop", "backprop+frozen"))
    md = (tmp_path / "paired_inference.md").read_text()
    assert md.startswith("# Inference (`predict`")
    assert "| mnist | 3 |" in md
    bad = subprocess.run([sys.executable, str(HERE / "paired_slices.py"), "--inference",
                          "--models", "mnist:0", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "bad inference case 'mnist:0'" in bad.stderr
    bad = subprocess.run([sys.executable, str(HERE / "paired_slices.py"), "--inference",
                          "--frameworks", "backprop+adaptive", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown frameworks ['backprop+adaptive']" in bad.stderr


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_setaffinity")
def test_paired_slices_busy_cores(tmp_path):
    """--busy-cores: refused before any worker starts where it would leave no CPU free; a
    busy process runs pinned to the CPU it was given until killed."""
    import paired_slices

    cpus = sorted(os.sched_getaffinity(0))
    bad = subprocess.run([sys.executable, str(HERE / "paired_slices.py"), "--models", "tiny",
                          "--busy-cores", str(len(cpus)), "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--busy-cores must leave at least one" in bad.stderr
    assert not list(tmp_path.iterdir())
    proc = paired_slices.busy_process(cpus[-1])
    try:
        deadline = time.monotonic() + 10
        while os.sched_getaffinity(proc.pid) != {cpus[-1]} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.sched_getaffinity(proc.pid) == {cpus[-1]}
        assert proc.poll() is None  # still spinning
    finally:
        proc.kill()
    assert proc.wait(timeout=10) != 0


def test_tile_ceiling_smoke(tmp_path):
    """tile_ceiling.py end to end: the tile's rates, the plans' products and predict's ops
    at 16 rows, each a positive time, named as the program runs them."""
    proc = subprocess.run([sys.executable, str(HERE / "tile_ceiling.py"), "--smoke",
                           "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "tile_ceiling.json").read_text())
    (row,) = data["ceiling"]
    assert row["one_thread_gflops"] > 0 and row["two_threads_gflops"] > 0
    assert [(p["shape"], p["rows"]) for p in data["products"]] == [
        ("256x784", 16), ("256x784", 32), ("256x256", 16), ("256x256", 32)]
    assert [o["op"] for o in data["ops"]] == ["transpose in", "dense 784->256",
                                              "dense 256->256", "dense 256->10",
                                              "transpose out"]
    assert all(o["us"] > 0 for o in data["ops"]) and data["predict_us"] > 0
    assert "| whole `predict` call |" in (tmp_path / "tile_ceiling.md").read_text()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs and sched_setaffinity (one is kept busy)")
def test_busy_core_smoke(tmp_path):
    """busy_core.py end to end: every setting timed under both conditions."""
    proc = subprocess.run([sys.executable, str(HERE / "busy_core.py"), "--smoke",
                           "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads((tmp_path / "busy_core.json").read_text())["results"]
    assert result["model"] == "tiny" and set(result["conditions"]) == {"free", "busy"}
    for runs in result["conditions"].values():
        assert set(runs) == {"fixed", "adaptive", "one thread"}
        assert all(p["steps"] > 0 and p["whole_ms"] > 0 for phases in runs.values()
                   for p in phases)
    assert "| tiny | busy |" in (tmp_path / "busy_core.md").read_text()


def test_gemm_backends_smoke(tmp_path):
    """gemm_backends.py end to end: every backend that can run here timed in every round
    against NumPy's BLAS (the tiles wherever Numba compiles; MKL where it loads)."""
    proc = subprocess.run([sys.executable, str(HERE / "gemm_backends.py"), "--smoke",
                           "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gemm_backends.json").read_text())
    backends = result["backends"]
    assert "numba" in backends  # (the JIT runs in this suite)
    assert ("mkl" in backends) == ("mkl cannot be used here" not in proc.stdout)
    rows = result["rows"]
    assert [r["model"] for r in rows] == ["tiny", "b1024"]
    for r in rows:
        assert r["ms"]["numpy"] > 0 and all(r["ms"][b] > 0 for b in backends)
        for q in r["ratios"].values():
            assert q["min"] <= q["median"] <= q["max"]
    assert "| b1024 | 1024 |" in (tmp_path / "gemm_backends.md").read_text()
    products = result["products"]
    assert [(p["shape"], p["form"]) for p in products] == [
        (shape, form) for shape in ("32×64×32", "32×32×10") for form in ("X·Wᵀ", "δᵀ·X", "δ·W")]
    assert all(p["us"][b] > 0 for p in products for b in ("numpy", *backends))
    assert all(p["layers_use"]["numba"] == "numpy" for p in products)  # below MIN_MACS


def test_denormal_states_smoke():
    proc = subprocess.run([sys.executable, str(HERE / "denormal_states.py"), "--steps", "20",
                           "--rounds", "2", "--calls", "3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "denormal values: exp_avg" in proc.stdout and "ratio" in proc.stdout
    assert "jax.jit flushes denormals to zero:" in proc.stdout
