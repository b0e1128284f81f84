"""``python -m backprop``: train / evaluate / predict / info end to end, in subprocesses."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


# The CLI runs on the CPU here, whatever the test job selected (the GPU CI sets
# BACKPROP_DEVICE=cuda and BACKPROP_KERNELS=cupy, which cannot run CPU arrays).
CPU_ENV = {**os.environ, "BACKPROP_DEVICE": "cpu", "BACKPROP_KERNELS": "auto"}


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "backprop", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=CPU_ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = run("train", "--data", "two_moons", "--hidden", "16", "--activation", "tanh",
               "--lr", "0.02", "--epochs", "6", "--batch-size", "16", "--seed", "1",
               "--device", "cpu", "--out", out, "--verbose", "2")
    return out, proc.stdout


def test_train_writes_model_history_and_plot(trained):
    out, stdout = trained
    assert "device cpu, kernels " in stdout and "Epoch 6/6" in stdout
    assert "test loss" in stdout and "test" in stdout.splitlines()[-3]
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == list(range(6)) and len(history["val_accuracy"]) == 6
    rows = list(csv.DictReader((out / "history.csv").read_text().splitlines()))
    assert len(rows) == 6 and float(rows[-1]["loss"]) == pytest.approx(history["loss"][-1])
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_evaluate_reproduces_the_test_metrics_of_train(trained):
    out, stdout = trained
    line = next(ln for ln in stdout.splitlines() if ln.startswith("test "))
    accuracy = float(line.split("accuracy ")[1].split(",")[0])
    result = json.loads(run("evaluate", out / "model.npz", "--json").stdout)
    assert result["split"] == "test" and result["rows"] == 60  # 15 % of 400
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-4)
    whole = json.loads(run("evaluate", out / "model.npz", "--split", "all", "--json").stdout)
    assert whole["rows"] == 400


def test_predict_to_file_and_stdout(trained, tmp_path):
    out, _ = trained
    target = tmp_path / "pred.csv"
    proc = run("predict", out / "model.npz", "--out", target, "--proba")
    rows = list(csv.reader(target.read_text().splitlines()))
    assert rows[0] == ["prediction", "p_0", "p_1"] and len(rows) == 61
    assert all(r[0] in ("0", "1") and abs(float(r[1]) + float(r[2]) - 1) < 1e-5 for r in rows[1:])
    assert "wrote 60 predictions" in proc.stderr
    assert run("predict", out / "model.npz").stdout.splitlines()[1:] == [r[0] for r in rows[1:]]


def test_csv_with_string_labels_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 2))
    path = tmp_path / "pets.csv"
    with open(path, "w") as f:
        f.write("weight,height,kind\n")
        for a, b in X:
            f.write(f"{a:.4f},{b:.4f},{'cat' if a > 0 else 'dog'}\n")
    run("train", "--data", path, "--target", "kind", "--hidden", "8", "--epochs", "8",
        "--batch-size", "8", "--lr", "0.02", "--out", tmp_path / "r", "--no-plot",
        "--verbose", "0")
    assert not (tmp_path / "r" / "curves.png").exists()
    model = tmp_path / "r" / "model.npz"
    assert len(run("predict", model, "--data", path).stdout.split()) == 1 + 18  # test rows
    preds = run("predict", model, "--data", path, "--split", "all").stdout.split()
    truth = ["cat" if a > 0 else "dog" for a, _ in X]
    assert preds[0] == "prediction" and len(preds) == 121
    assert np.mean([p == t for p, t in zip(preds[1:], truth)]) > 0.9


def test_info_reports_device_kernels_and_fallback():
    info = json.loads(run("info", "--json").stdout)
    assert info["device"] == "cpu" and info["kernels"] in ("numba_cpu", "reference")
    assert set(info["kernel_backends"]) == {"reference", "numba_cpu", "numba_cuda", "cupy"}
    assert "numba" in info and "cuda_reason" in info
    assert "kernels" in run("info").stdout


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown command 'nope'"),
    (["train", "--data", "missing.csv"], "neither a built-in data set"),
    (["evaluate", "missing.npz"], "no checkpoint"),
    (["train", "--data", "digits", "--kernels", "cupy", "--device", "cpu"], "CUDA arrays"),
])
def test_errors_are_one_line_without_traceback(args, message):
    proc = run(*args, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worked_example_matches_the_library():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "worked_example.py")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=CPU_ENV)
    assert proc.returncode == 0, proc.stderr
    assert "δ1" in proc.stdout and proc.stdout.rstrip().endswith("All values match.")
    assert proc.stdout.count("library == by hand") == 13
