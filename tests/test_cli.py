"""``python -m backprop``: train / evaluate / predict / info end to end (in subprocesses), and
the error contract (mostly in-process through ``cli.main``): every user error is one line
on stderr with exit 2, found before training, never a traceback unless --debug."""
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


# =======================================================================================
# User errors: one line on stderr, exit 2, no traceback (in-process through cli.main)
@pytest.fixture(autouse=True)
def cpu_runtime(monkeypatch):
    """In-process runs see a CPU environment and fresh device/kernel/dtype choices (the CLI
    reads BACKPROP_* lazily and would otherwise reuse what an earlier test resolved), and
    leave the process's choices as they found them."""
    from backprop import backend, kernels

    monkeypatch.setenv("BACKPROP_DEVICE", "cpu")
    monkeypatch.setenv("BACKPROP_KERNELS", "auto")
    for name in ("BACKPROP_DTYPE", "BACKPROP_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    for key, value in (("device", None), ("fallback_reason", ""), ("dtype", None)):
        monkeypatch.setitem(backend._default, key, value)
    monkeypatch.setitem(kernels._state, "choice", None)
    monkeypatch.setitem(kernels._state, "tables", kernels._state["tables"])


@pytest.fixture
def cli(capsys):
    """``cli(*args) -> (exit code, stdout, stderr)`` of ``backprop.cli.main`` in-process."""
    from backprop.cli import main

    def run_cli(*args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # main returns codes; a regression then fails an assert
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run_cli


class FitCalled(Exception):
    """Raised by the ``no_fit`` stub: the command got as far as training."""


@pytest.fixture
def no_fit(monkeypatch):
    """Replace ``training.fit`` by a stub that records its arguments and raises FitCalled,
    so that a test can check what would be trained and that checks ran before training."""
    from backprop import training

    calls = []

    def stub(model, X, y, **kwargs):
        calls.append({"model": model, "X": X, "y": y, **kwargs})
        raise FitCalled("training started")

    monkeypatch.setattr(training, "fit", stub)
    return calls


def assert_user_error(code, err, *fragments):
    """Exit 2, exactly one ``error:`` line (argparse's own ``prog: error:`` counts), every
    fragment in it, and no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:") or ": error:" in ln]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("args, allowed", [
    (["train", "--activation", "nope"], "relu"),
    (["train", "--epochs", "-1"], ">= 1"),
    (["train", "--epochs", "0"], ">= 1"),
    (["train", "--batch-size", "0"], ">= 1"),
    (["train", "--lr", "-0.1"], "> 0"),
    (["train", "--lr", "nan"], "> 0"),
    (["train", "--weight-decay", "-1"], ">= 0"),
    (["train", "--hidden", "0"], "128,64"),
    (["train", "--hidden", "64,x"], "128,64"),
    (["train", "--dropout", "1.5"], "[0, 1)"),
    (["train", "--split", "0.5,0.5,0.5"], "sum to 1"),
    (["train", "--split", "0.8,0.2"], "three"),
    (["train", "--split", "0,0.5,0.5"], "train"),
    (["train", "--split", "a,b,c"], "0.7,0.15,0.15"),
    (["train", "--device", "tpu"], "cuda:N"),
    (["train", "--seed", "-1"], ">= 0"),
    (["train", "--patience", "-2"], ">= 0"),
    (["train", "--kernels", "fast"], "reference"),
    (["train", "--encoding", "klingon"], "utf-8"),
    (["train", "--target", "y", "--data", "xor"], "CSV files only"),
    (["train", "--task", "regression", "--data", "digits"], "CSV files only"),
    (["evaluate", "m.npz", "--batch-size", "0"], ">= 1"),
    (["predict", "m.npz", "--batch-size", "0"], ">= 1"),
    (["predict", "m.npz", "--device", "gpu:x"], "cuda:N"),
])
def test_bad_arguments_fail_at_parse_time(cli, no_fit, args, allowed):
    code, _, err = cli(*args)
    flag = next(a for a in args if a.startswith("--"))
    assert_user_error(code, err, flag, allowed)
    assert not no_fit


def test_patience_without_a_validation_part_is_an_argument_error(cli, no_fit):
    code, _, err = cli("train", "--split", "0.7,0,0.3", "--patience", "3")
    assert_user_error(code, err, "--patience", "validation")


@pytest.mark.parametrize("args, decay", [([], 0.01), (["--weight-decay", "0"], 0.0)])
def test_weight_decay_defaults_to_the_optimizers(cli, no_fit, tmp_path, args, decay):
    # an explicit 0 turns AdamW's decoupled decay off; no flag keeps AdamW's default
    cli("train", "--data", "two_moons", "--hidden", "4", "--optimizer", "adamw", *args,
        "--out", tmp_path / "r")  # not the shared default runs/latest: tests run in parallel
    assert no_fit[0]["optimizer"].hyper["weight_decay"] == decay


# ---------------------------------------------------------------------------------------
# Environment: info survives bad values; BACKPROP_* apply unless a flag is given
@pytest.mark.parametrize("var, value, accepted", [
    ("BACKPROP_DEVICE", "tpu", "cuda:N"),
    ("BACKPROP_DEVICE", "cuda:99", "cpu"),  # unavailable on any machine
    ("BACKPROP_DTYPE", "float16", "float64"),
    ("BACKPROP_KERNELS", "fast", "reference"),
])
def test_info_reports_a_bad_environment_value(cli, monkeypatch, var, value, accepted):
    monkeypatch.setenv(var, value)
    code, out, err = cli("info")
    assert code == 1 and "Traceback" not in err, err
    problem = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert var in problem and repr(value) in problem and accepted in problem
    assert "numpy" in out and np.__version__ in out and "cuda_reason" in out
    code, out, err = cli("info", "--json")
    info = json.loads(out)
    assert code == 1 and any(var in p for p in info["problems"])
    assert info["numpy"] == np.__version__ and "kernel_backends" in info


def test_info_exits_0_with_no_problems(cli):
    code, out, _ = cli("info", "--json")
    assert code == 0 and json.loads(out)["problems"] == []


def test_environment_device_applies_unless_flag_given(cli, monkeypatch, no_fit):
    monkeypatch.setenv("BACKPROP_DEVICE", "cuda:99")
    code, _, err = cli("train", "--data", "missing.csv")
    assert_user_error(code, err, "BACKPROP_DEVICE", "cuda:99", "--device cpu")
    code, _, err = cli("train", "--data", "missing.csv", "--device", "cpu")
    assert_user_error(code, err, "neither a built-in data set")  # got past the device
    code, _, err = cli("train", "--data", "missing.csv", "--device", "cuda:99")
    assert_user_error(code, err, "cuda:99")
    assert "neither" not in err  # the device is checked before the data is loaded


def test_environment_kernels_and_dtype_apply_unless_flags_given(cli, monkeypatch, no_fit,
                                                                tmp_path):
    monkeypatch.setenv("BACKPROP_KERNELS", "reference")
    monkeypatch.setenv("BACKPROP_DTYPE", "float64")
    code, out, err = cli("train", "--data", "two_moons", "--hidden", "4", "--epochs", "1",
                         "--out", tmp_path / "r")
    assert code == 1 and "training started" in err  # the stub stopped it
    assert "kernels reference" in out
    assert no_fit[0]["X"].dtype == np.float64
    assert all(p.data.dtype == np.float64 for p in no_fit[0]["model"].parameters())
    code, out, err = cli("train", "--data", "two_moons", "--hidden", "4", "--epochs", "1",
                         "--kernels", "auto", "--dtype", "float32", "--out", tmp_path / "r")
    assert "kernels reference" not in out and no_fit[1]["X"].dtype == np.float32


# ---------------------------------------------------------------------------------------
# train: data, split and output folder are checked before the first epoch
def _csv(path, content):
    """Write ``content`` (str as UTF-8, or bytes as they are) to ``path``; return the path."""
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def test_empty_test_part_is_found_before_training(cli, no_fit, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli("train", "--data", "xor", "--out", out)
    assert_user_error(code, err, "test part", "--split")
    assert not no_fit and not out.exists()


def test_zero_fractions_leave_parts_out(cli, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli("train", "--data", "xor", "--split", "1,0,0", "--hidden", "4",
                            "--epochs", "2", "--batch-size", "4", "--out", out, "--no-plot",
                            "--verbose", "0")
    assert code == 0, err
    assert "no test part" in stdout and (out / "model.npz").exists()
    code, _, err = cli("evaluate", out / "model.npz")
    assert_user_error(code, err, "--split all")
    code, stdout, err = cli("evaluate", out / "model.npz", "--split", "all", "--json")
    assert code == 0 and json.loads(stdout)["rows"] == 4


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_unusable_out_folder_is_found_before_training(cli, no_fit, tmp_path, where):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    out = blocker if where == "file" else blocker / "run"
    code, _, err = cli("train", "--data", "two_moons", "--out", out)
    assert_user_error(code, err, "--out", str(out))
    assert not no_fit and blocker.read_text() == "not a folder"


@pytest.mark.parametrize("text, fragments", [
    ("a,b,y\n1,2,0\ninf,3,1\n1,2,0\n4,4,1\n", ["row 3", "column 'a'", "finite"]),
    ("a,b,y\n1,2,0\n1,nan,1\n1,2,0\n4,4,1\n", ["row 3", "column 'b'", "missing"]),
    ("a,b,y\n1,2,0\n1,x,1\n1,2,0\n4,4,1\n", ["row 3", "column 'b'", "not a number"]),
    (b"a,b,y\n1,2,0\n\xff,3,1\n", ["UTF-8", "offset 12", "line 3"]),
    ("a,b,y\n" + "1,2,k\n" * 8, ["one class", "'k'"]),
    ("y\n0\n1\n", ["no feature columns"]),
    ("", ["empty"]),
    ("a,b,y\n", ["no data rows"]),
])
def test_bad_csv_is_found_before_training(cli, no_fit, tmp_path, text, fragments):
    path = _csv(tmp_path / "d.csv", text)
    code, _, err = cli("train", "--data", path, "--target", "y", "--out", tmp_path / "r")
    assert_user_error(code, err, *fragments)
    assert not no_fit


def test_class_missing_from_the_train_part_is_found_before_training(cli, no_fit, tmp_path):
    rows = "".join(f"{i},{i % 3},{'a' if i % 2 else 'b'}\n" for i in range(40))
    path = _csv(tmp_path / "d.csv", "u,v,y\n" + rows + "9,9,rare\n")
    code, _, err = cli("train", "--data", path, "--target", "y", "--split", "0.3,0.35,0.35")
    assert_user_error(code, err, "'rare'", "train part")
    assert not no_fit


# ---------------------------------------------------------------------------------------
# Files, checkpoints and columns: one line, exit 2
@pytest.fixture(scope="module")
def regression_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("regression")
    run("train", "--data", "regression", "--hidden", "4", "--epochs", "1", "--out", out,
        "--no-plot", "--verbose", "0")
    return out / "model.npz"


@pytest.fixture
def files(tmp_path, trained, regression_model):
    model = trained[0] / "model.npz"
    blob = model.read_bytes()
    made = {"dir": tmp_path, "model": model, "regression": regression_model,
            "trunc": tmp_path / "trunc.npz",
            "garbage": tmp_path / "garbage.npz", "wide": tmp_path / "wide.csv",
            "nodir": tmp_path / "missing" / "p.csv"}
    made["trunc"].write_bytes(blob[:len(blob) // 2])
    made["garbage"].write_bytes(b"not a zip archive")
    made["wide"].write_text("x0,x1,x2,y\n1,2,3,0\n2,3,4,1\n")
    return made


@pytest.mark.parametrize("args, fragments", [
    (["train", "--data", "{dir}"], ["is a directory", "CSV file"]),
    (["train", "--data", "missing.csv"], ["neither a built-in data set"]),
    (["evaluate", "{dir}"], ["is a directory", "model.npz"]),
    (["evaluate", "{dir}/none.npz"], ["no checkpoint"]),
    (["evaluate", "{trunc}"], ["truncated"]),
    (["predict", "{garbage}"], ["not a backprop checkpoint"]),
    (["evaluate", "{model}", "--data", "digits"], ["64 feature columns", "2"]),
    (["evaluate", "{model}", "--data", "{wide}"], ["'x2'"]),
    (["evaluate", "{model}", "--data", "{wide}", "--split", "test"], ["--split all"]),
    (["predict", "{model}", "--out", "{dir}"], ["--out", "directory"]),
    (["predict", "{model}", "--out", "{nodir}"], ["--out", "folder"]),
    (["predict", "{regression}", "--proba"], ["--proba", "regression"]),
])
def test_file_and_column_errors(cli, files, args, fragments):
    code, _, err = cli(*[a.format(**files) for a in args])
    assert_user_error(code, err, *fragments)


def test_csv_without_target_lists_the_columns(cli, no_fit, tmp_path):
    path = _csv(tmp_path / "d.csv", "a,b\n1,2\n3,4\n")
    code, _, err = cli("train", "--data", path)
    assert_user_error(code, err, "--target", "a, b")


def _pets(path, n=120):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 2))
    with open(path, "w") as f:
        f.write("weight,height,kind\n")
        for a, b in X:
            f.write(f"{a:.4f},{b:.4f},{'cat' if a > 0 else 'dog'}\n")
    return path


@pytest.fixture
def pets_model(cli, tmp_path):
    path = _pets(tmp_path / "pets.csv")
    code, _, err = cli("train", "--data", path, "--target", "kind", "--hidden", "8",
                       "--epochs", "3", "--batch-size", "16", "--lr", "0.05",
                       "--out", tmp_path / "r", "--no-plot", "--verbose", "0")
    assert code == 0, err
    return tmp_path / "r" / "model.npz", path


def test_predict_drops_the_target_column_of_a_labelled_csv(cli, pets_model, tmp_path):
    model, path = pets_model
    other = tmp_path / "other.csv"  # not the training file: every row, target column present
    other.write_text(path.read_text())
    code, out, err = cli("predict", model, "--data", other)
    assert code == 0, err
    assert out.split()[0] == "prediction" and len(out.split()) == 121
    code, out, err = cli("evaluate", model, "--data", other, "--json")
    assert code == 0 and json.loads(out)["rows"] == 120
    unlabelled = _csv(tmp_path / "u.csv", "weight,height,kind\n1,2,\n-1,0,\n")
    code, out, err = cli("predict", model, "--data", unlabelled)  # blank targets: unread
    assert code == 0 and len(out.split()) == 3, err


def test_csv_in_another_encoding(cli, tmp_path):
    drinks = ("caf\u00e9", "th\u00e9")
    rows = "".join(f"{i % 7},{(i * 3) % 5},{drinks[i % 2]}\n" for i in range(60))
    path = _csv(tmp_path / "cp.csv", ("a,b,drink\n" + rows).encode("cp1252"))
    out = tmp_path / "r"
    code, _, err = cli("train", "--data", path, "--target", "drink", "--out", out,
                       "--hidden", "4", "--epochs", "1", "--no-plot", "--verbose", "0")
    assert_user_error(code, err, "cp1252", "--encoding")
    code, _, err = cli("train", "--data", path, "--target", "drink", "--out", out,
                       "--hidden", "4", "--epochs", "1", "--no-plot", "--verbose", "0",
                       "--encoding", "cp1252")
    assert code == 0, err
    code, stdout, err = cli("predict", out / "model.npz", "--split", "all")  # stored encoding
    assert code == 0 and set(stdout.split()[1:]) <= set(drinks), err


def test_predict_checks_columns_against_the_model(cli, pets_model, tmp_path):
    model, _ = pets_model
    reordered = _csv(tmp_path / "r.csv", "height,weight\n1,2\n3,4\n")
    code, out, err = cli("predict", model, "--data", reordered)
    assert code == 0 and len(out.split()) == 3, err
    missing = _csv(tmp_path / "m.csv", "weight,kind\n1,cat\n")
    code, _, err = cli("predict", model, "--data", missing)
    assert_user_error(code, err, "'height'", "weight, height")
    extra = _csv(tmp_path / "e.csv", "weight,height,id\n1,2,7\n")
    code, _, err = cli("predict", model, "--data", extra)
    assert_user_error(code, err, "'id'")
    code, _, err = cli("evaluate", model, "--data", reordered)
    assert_user_error(code, err, "'kind'")


# ---------------------------------------------------------------------------------------
# Ctrl-C, bugs and --debug
def test_ctrl_c_exits_130_and_saves_nothing(cli, monkeypatch, tmp_path):
    from backprop import training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "fit", interrupted)
    out = tmp_path / "new" / "run"
    try:
        code, _, err = cli("train", "--data", "two_moons", "--out", out)
    except KeyboardInterrupt:  # escaping, it would stop the whole test session
        pytest.fail("KeyboardInterrupt escaped the CLI")
    assert code == 130 and err.strip() == "interrupted", err
    assert not (tmp_path / "new").exists()  # the folders train created are gone again


@pytest.fixture
def bug(monkeypatch):
    from backprop import training

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(training, "fit", broken)


def test_internal_error_is_one_line_exit_1(cli, bug, tmp_path):
    code, _, err = cli("train", "--data", "two_moons", "--out", tmp_path / "r")
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "ZeroDivisionError: boom" in lines[0]
    assert "--debug" in lines[0] and "BACKPROP_DEBUG=1" in lines[0]


@pytest.mark.parametrize("how", ["global", "command", "env"])
def test_debug_shows_the_traceback(cli, bug, monkeypatch, tmp_path, how):
    args = ["train", "--data", "two_moons", "--out", tmp_path / "r"]
    if how == "global":
        args = ["--debug", *args]
    elif how == "command":
        args.append("--debug")
    else:
        monkeypatch.setenv("BACKPROP_DEBUG", "1")
    code, _, err = cli(*args)
    assert code == 1 and "Traceback" in err and "ZeroDivisionError: boom" in err


def test_debug_shows_the_traceback_of_a_user_error(cli):
    code, _, err = cli("--debug", "train", "--data", "missing.csv")
    assert code == 2 and "Traceback" in err and "CLIError" in err


# ---------------------------------------------------------------------------------------
# Through a real process: exit codes and no traceback
@pytest.mark.parametrize("args, env, code, message", [
    (["train", "--epochs", "-1"], {}, 2, "--epochs"),
    (["info"], {"BACKPROP_DEVICE": "tpu"}, 1, "BACKPROP_DEVICE='tpu'"),
    (["train", "--data", "{csv}", "--target", "y"], {}, 2, "UTF-8"),
])
def test_process_exit_codes(tmp_path, args, env, code, message):
    csv_path = _csv(tmp_path / "latin1.csv", "a,y\ncaf\u00e9,0\n".encode("latin-1"))
    proc = subprocess.run(
        [sys.executable, "-m", "backprop", *[a.format(csv=csv_path) for a in args]],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**CPU_ENV, **env})
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_clips_gradients_when_asked(cli, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli("train", "--data", "two_moons", "--hidden", "8", "--epochs", "2",
                       "--clip-grad-norm", "0.1", "--clip-grad-value", "0.05", "--out", out,
                       "--no-plot", "--verbose", "0")
    assert code == 0 and (out / "model.npz").exists(), err


@pytest.mark.parametrize("flag", ["--clip-grad-norm", "--clip-grad-value"])
def test_train_refuses_a_clipping_bound_that_is_not_positive(cli, flag, tmp_path):
    code, _, err = cli("train", flag, "0", "--out", tmp_path / "x")
    assert code == 2
    assert f"argument {flag}: expected a finite number > 0" in err
    assert not (tmp_path / "x").exists()


def test_train_adds_l1_l2_penalties_and_prints_the_graph(cli, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli("train", "--data", "two_moons", "--hidden", "8", "--epochs", "1",
                            "--l1", "1e-4", "--l2", "1e-3", "--graph", "--out", out,
                            "--no-plot", "--verbose", "0")
    assert code == 0, err
    assert "Forward (each node" in stdout and "dZ0 = dA0 ⊙ relu'(Z0)" in stdout
    code, _, err = cli("train", "--l2", "-1", "--out", tmp_path / "x")
    assert code == 2 and "argument --l2: expected a finite number >= 0" in err


# ---------------------------------------------------------------------------------------
# Model, loss and schedule options: batch norm and dropout placement, init, loss, schedules
def _train_ok(cli, out, *args):
    """Train a small two_moons model (unless --data is given) into ``out``; returns stdout."""
    base = [] if "--data" in args else ["--data", "two_moons"]
    code, stdout, err = cli("train", *base, "--hidden", "8,4", "--epochs", "2",
                            "--batch-size", "32", "--out", out, "--no-plot", "--verbose", "0",
                            *args)
    assert code == 0, err
    return stdout


def _layers(path):
    from backprop import io

    ckpt = io.load_checkpoint(path)
    return ckpt, [type(layer).__name__ for layer in ckpt.model.layers]


def _check_evaluate_and_predict(cli, model):
    code, out, err = cli("evaluate", model, "--json")
    assert code == 0, err
    result = json.loads(out)
    code, out, err = cli("predict", model, "--proba")
    assert code == 0, err
    return result, list(csv.reader(out.splitlines()))


@pytest.mark.parametrize("placement, layers", [
    ("none", ["Dense", "Dense", "Dense"]),
    ("after", ["Dense", "BatchNorm1d", "Dense", "BatchNorm1d", "Dense"]),
    ("before", ["Dense", "BatchNorm1d", "ReLU", "Dense", "BatchNorm1d", "ReLU", "Dense"]),
])
def test_batch_norm_placement_builds_the_layers(cli, tmp_path, placement, layers):
    _train_ok(cli, tmp_path / "r", "--batch-norm", placement)
    ckpt, names = _layers(tmp_path / "r" / "model.npz")
    assert names == layers and ckpt.extra["options"]["batch_norm"] == placement
    dense = [layer for layer in ckpt.model.layers if type(layer).__name__ == "Dense"]
    hidden_act = "identity" if placement == "before" else "relu"
    assert [d.activation.name for d in dense] == [hidden_act, hidden_act, "identity"]
    # before: the bias is BatchNorm1d's β; the Dense keeps the activation's (He) init
    assert [d.b is None for d in dense[:2]] == [placement == "before"] * 2
    if placement == "before":
        assert [d.init for d in dense[:2]] == ["he_uniform"] * 2
    if placement != "none":  # the running statistics were trained and saved
        bn = ckpt.model.layers[1]
        assert not np.allclose(np.asarray(bn.running_mean), 0.0)
    result, rows = _check_evaluate_and_predict(cli, tmp_path / "r" / "model.npz")
    assert result["rows"] == 60 and 0.0 <= result["accuracy"] <= 1.0
    assert rows[0] == ["prediction", "p_0", "p_1"] and len(rows) == 61


def test_dropout_placement_input_and_hidden(cli, tmp_path):
    _train_ok(cli, tmp_path / "r", "--input-dropout", "0.2", "--dropout", "0.1",
              "--batch-norm", "before", "--activation", "tanh")
    ckpt, names = _layers(tmp_path / "r" / "model.npz")
    assert names == ["Dropout", "Dense", "BatchNorm1d", "Tanh", "Dropout",
                     "Dense", "BatchNorm1d", "Tanh", "Dropout", "Dense"]
    assert [layer.p for layer in ckpt.model.layers if names[0] == type(layer).__name__] == \
        pytest.approx([0.2, 0.1, 0.1])
    assert ckpt.model.layers[0].counter > 0  # the input dropout drew masks in training
    options = ckpt.extra["options"]
    assert (options["dropout"], options["input_dropout"]) == (0.1, 0.2)
    _check_evaluate_and_predict(cli, tmp_path / "r" / "model.npz")


def test_dropout_alone_keeps_its_placement(cli, tmp_path):
    _train_ok(cli, tmp_path / "r", "--dropout", "0.3")
    _, names = _layers(tmp_path / "r" / "model.npz")
    assert names == ["Dense", "Dropout", "Dense", "Dropout", "Dense"]


@pytest.mark.parametrize("flag, name", [("he_normal", "he_normal"), ("xavier", "xavier_uniform"),
                                        ("HE", "he_uniform")])
def test_init_applies_to_every_dense_layer(cli, no_fit, tmp_path, flag, name):
    cli("train", "--data", "digits", "--hidden", "256,128", "--activation", "tanh",
        "--init", flag, "--out", tmp_path / "r")
    dense = [layer for layer in no_fit[0]["model"].layers if hasattr(layer, "W")]
    assert [d.init for d in dense] == [name] * 3
    W = np.asarray(dense[1].W.data, dtype=np.float64)  # (128, 256): fan_in 256, fan_out 128
    std = {"he_normal": np.sqrt(2 / 256), "he_uniform": np.sqrt(2 / 256),
           "xavier_uniform": np.sqrt(2 / (256 + 128))}[name]
    assert W.std() == pytest.approx(std, rel=0.05)


def test_init_defaults_to_the_library_choice_per_layer(cli, tmp_path):
    _train_ok(cli, tmp_path / "r")
    ckpt, _ = _layers(tmp_path / "r" / "model.npz")
    options = ckpt.extra["options"]
    assert options["init"] == "auto"
    assert options["initializers"] == {"hidden": ["he_uniform"], "output": "xavier_uniform"}
    assert [layer.init for layer in ckpt.model.layers] == [None] * 3


def test_nll_loss_trains_a_log_softmax_output(cli, tmp_path):
    from backprop import data

    out = tmp_path / "r"
    stdout = _train_ok(cli, out, "--loss", "nll", "--epochs", "4", "--lr", "0.02")
    ckpt, _ = _layers(out / "model.npz")
    assert ckpt.model.layers[-1].activation.name == "log_softmax"
    assert ckpt.extra["options"]["loss"] == "nll"
    test_loss = float(stdout.split("test loss ")[1].split(",")[0])
    result, rows = _check_evaluate_and_predict(cli, out / "model.npz")
    assert result["loss"] == pytest.approx(test_loss, abs=1e-4)
    # --proba gives probabilities: exp of the log-softmax outputs
    code, stdout, err = cli("predict", out / "model.npz", "--proba", "--split", "all")
    assert code == 0, err
    proba = np.array([[float(v) for v in r[1:]] for r in csv.reader(stdout.splitlines()[1:])])
    X, _ = data.two_moons(n=400, noise=0.15, seed=0)
    X = (X - ckpt.extra["mean"]) / ckpt.extra["std"]
    logp = np.asarray(ckpt.model(X.astype(np.float32)), dtype=np.float64)
    assert np.allclose(proba, np.exp(logp), atol=1e-5)
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("loss", ["half_mse", "l1", "mse"])
def test_regression_losses(cli, tmp_path, loss):
    out = tmp_path / "r"
    _train_ok(cli, out, "--data", "regression", "--loss", loss)
    history = json.loads((out / "history.json").read_text())
    if loss == "l1":  # the L1 loss is the MAE of the standardised targets
        assert history["loss"] == pytest.approx(history["mae"], rel=1e-4)
    ckpt, _ = _layers(out / "model.npz")
    assert ckpt.extra["options"]["loss"] == loss and ckpt.extra["task"] == "regression"
    code, stdout, err = cli("evaluate", out / "model.npz", "--json")
    assert code == 0 and set(json.loads(stdout)) >= {"mse", "mae", "r2"}, err
    code, stdout, err = cli("predict", out / "model.npz")
    assert code == 0 and len(stdout.split()) == 1 + 150, err


def test_a_regression_loss_makes_a_csv_a_regression_task(cli, tmp_path):
    rows = "".join(f"{i % 7},{(i * 3) % 5},{i % 3}\n" for i in range(60))
    path = _csv(tmp_path / "n.csv", "a,b,y\n" + rows)  # auto: integer labels, classification
    _train_ok(cli, tmp_path / "r", "--data", path, "--target", "y", "--loss", "mse")
    ckpt, _ = _layers(tmp_path / "r" / "model.npz")
    assert ckpt.extra["task"] == "regression" and ckpt.model.layers[-1].out_features == 1
    pets = _pets(tmp_path / "pets.csv")  # string labels cannot be regressed
    code, _, err = cli("train", "--data", pets, "--target", "kind", "--loss", "l1",
                       "--out", tmp_path / "p")
    assert_user_error(code, err, "'cat'", "--loss l1 makes this a regression task")
    assert not (tmp_path / "p").exists()


LR = 0.1


def _cosine(t, T, lo=0.0):
    return lo + (LR - lo) * (1 + np.cos(np.pi * t / T)) / 2


@pytest.mark.parametrize("args, epochs, expected, kind", [
    (["--schedule", "step", "--step-size", "2", "--gamma", "0.5"], 5,
     [LR, LR, LR / 2, LR / 2, LR / 4], "StepLR"),
    (["--schedule", "step"], 3, [LR] * 3, "StepLR"),  # default: step size 10
    (["--schedule", "exponential", "--gamma", "0.5"], 3, [LR, LR / 2, LR / 4], "ExponentialLR"),
    (["--schedule", "cosine"], 4, [_cosine(t, 4) for t in range(4)], "CosineAnnealingLR"),
    (["--schedule", "cosine", "--min-lr", "0.01"], 3, [_cosine(t, 3, 0.01) for t in range(3)],
     "CosineAnnealingLR"),
    (["--warmup-epochs", "2"], 4, [LR / 3, 2 * LR / 3, LR, LR], "LinearWarmup"),
    (["--warmup-epochs", "2", "--schedule", "cosine"], 5,
     [LR / 3, 2 * LR / 3, *(_cosine(t, 3) for t in range(3))], "LinearWarmup"),
    (["--warmup-epochs", "1", "--schedule", "step", "--step-size", "1", "--gamma", "0.1"], 3,
     [LR / 3, LR, LR / 10], "LinearWarmup"),
])
def test_schedule_sets_the_lr_of_each_epoch(cli, tmp_path, args, epochs, expected, kind):
    out = tmp_path / "r"
    _train_ok(cli, out, "--lr", str(LR), "--epochs", str(epochs), *args)
    history = json.loads((out / "history.json").read_text())
    assert history["lr"] == pytest.approx(expected, rel=1e-6)
    rows = list(csv.DictReader((out / "history.csv").read_text().splitlines()))
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-6)
    ckpt, _ = _layers(out / "model.npz")  # the schedule's state is in the checkpoint
    assert type(ckpt.scheduler).__name__ == kind and ckpt.scheduler.last_epoch == epochs
    assert ckpt.extra["options"]["schedule_config"]["type"] == kind
    _check_evaluate_and_predict(cli, out / "model.npz")


def test_no_schedule_keeps_the_lr_and_saves_no_scheduler(cli, tmp_path):
    _train_ok(cli, tmp_path / "r", "--lr", "0.05")
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert history["lr"] == pytest.approx([0.05, 0.05])
    ckpt, _ = _layers(tmp_path / "r" / "model.npz")
    assert ckpt.scheduler is None and ckpt.extra["options"]["schedule"] == "none"


@pytest.mark.parametrize("split, monitor", [("0.7,0.15,0.15", "val_loss"),
                                            ("0.8,0,0.2", "loss")])
def test_plateau_schedule_halves_the_lr_when_the_monitor_stalls(cli, tmp_path, split, monitor):
    out = tmp_path / "r"
    _train_ok(cli, out, "--hidden", "8", "--epochs", "8", "--lr", "1", "--split", split,
              "--schedule", "plateau", "--lr-patience", "0", "--gamma", "0.5",
              "--min-lr", "0.2")
    history = json.loads((out / "history.json").read_text())
    expected, best = [1.0], np.inf  # ReduceLROnPlateau, patience 0: halve after a bad epoch
    for value in history[monitor][:-1]:
        if value < best * (1 - 1e-4):
            best = value
            expected.append(expected[-1])
        else:
            expected.append(max(expected[-1] * 0.5, 0.2))
    assert history["lr"] == pytest.approx(expected) and min(expected) < 1.0  # it did stall
    ckpt, _ = _layers(out / "model.npz")
    assert type(ckpt.scheduler).__name__ == "ReduceLROnPlateau"
    assert ckpt.extra["options"]["plateau_monitor"] == monitor


def test_run_summary_states_the_options(cli, tmp_path):
    code, stdout, err = cli("train", "--data", "two_moons", "--hidden", "8", "--epochs", "3",
                            "--loss", "nll", "--init", "he_normal", "--batch-norm", "before",
                            "--dropout", "0.1", "--input-dropout", "0.2", "--lr", "0.01",
                            "--warmup-epochs", "1", "--schedule", "step", "--step-size", "1",
                            "--out", tmp_path / "r", "--no-plot", "--verbose", "2")
    assert code == 0, err
    assert ("model: loss nll (log-softmax output), init he_normal, batch norm before each "
            "hidden activation, dropout 0.1 after each hidden layer, input dropout 0.2"
            in stdout)
    assert ("training: adam, lr 0.01, linear warmup from lr×0.333 over 1 epoch, then step: "
            "lr × 0.1 every 1 epoch" in stdout)
    assert stdout.index("model: loss") < stdout.index("Epoch 1/3")
    code, stdout, err = cli("train", "--data", "regression", "--hidden", "8", "--epochs", "1",
                            "--schedule", "plateau", "--split", "0.8,0,0.2",
                            "--out", tmp_path / "s", "--no-plot", "--verbose", "2")
    assert code == 0, err
    assert ("model: loss mse, init he_uniform (hidden), xavier_uniform (output), no batch "
            "norm, no dropout" in stdout)
    assert ("training: adam, lr 0.001, plateau: lr × 0.1 (down to 0) after more than 10 "
            "epochs without improvement of loss" in stdout)


def test_graph_shows_batch_norm_activation_layers_and_log_softmax(cli, tmp_path):
    code, stdout, err = cli("train", "--data", "two_moons", "--hidden", "8", "--epochs", "1",
                            "--loss", "nll", "--batch-norm", "before", "--graph",
                            "--out", tmp_path / "r", "--no-plot", "--verbose", "0")
    assert code == 0, err
    assert "BatchNorm1d(8)" in stdout and "A2 = relu(A1)" in stdout
    assert "log Σ_row" in stdout and "NLLLoss" in stdout


@pytest.mark.parametrize("args, fragments", [
    (["--loss", "mse"], ["--loss", "regression loss", "digits", "cross_entropy, nll"]),
    (["--data", "regression", "--loss", "nll"], ["--loss", "classification", "mse, half_mse"]),
    (["--data", "x.csv", "--task", "regression", "--loss", "cross_entropy"],
     ["--loss", "--task regression"]),
    (["--loss", "hinge"], ["--loss", "invalid choice", "nll"]),
    (["--batch-norm", "middle"], ["--batch-norm", "invalid choice", "before"]),
    (["--batch-norm", "after", "--hidden", ""], ["--batch-norm", "--hidden ''"]),
    (["--batch-norm", "before", "--batch-size", "1"], ["--batch-norm", "--batch-size 2"]),
    (["--input-dropout", "1"], ["--input-dropout", "[0, 1)"]),
    (["--input-dropout", "-0.1"], ["--input-dropout", "[0, 1)"]),
    (["--init", "orthogonal"], ["--init", "he_normal", "xavier_uniform"]),
    (["--schedule", "linear"], ["--schedule", "invalid choice", "cosine"]),
    (["--schedule", "step", "--step-size", "0"], ["--step-size", ">= 1"]),
    (["--schedule", "step", "--gamma", "1"], ["--gamma", "< 1"]),
    (["--schedule", "step", "--gamma", "0"], ["--gamma", "> 0"]),
    (["--schedule", "cosine", "--min-lr", "-1"], ["--min-lr", ">= 0"]),
    (["--schedule", "plateau", "--lr-patience", "-1"], ["--lr-patience", ">= 0"]),
    (["--warmup-epochs", "-1"], ["--warmup-epochs", ">= 0"]),
    (["--step-size", "3"], ["--step-size", "--schedule step only", "not --schedule none"]),
    (["--schedule", "cosine", "--gamma", "0.5"], ["--gamma", "step, exponential or plateau"]),
    (["--schedule", "step", "--min-lr", "0"], ["--min-lr", "cosine or plateau"]),
    (["--schedule", "cosine", "--lr-patience", "2"], ["--lr-patience", "plateau only"]),
    (["--schedule", "cosine", "--min-lr", "0.01", "--lr", "0.01"], ["--min-lr", "below --lr"]),
    (["--schedule", "plateau", "--warmup-epochs", "2"], ["--warmup-epochs", "plateau"]),
    (["--warmup-epochs", "5", "--epochs", "5"], ["--warmup-epochs", "fewer warmup epochs"]),
])
def test_bad_model_and_schedule_options_fail_before_training(cli, no_fit, tmp_path, args,
                                                              fragments):
    code, _, err = cli("train", *args, "--out", tmp_path / "r")
    assert_user_error(code, err, *fragments)
    assert not no_fit and not (tmp_path / "r").exists()


def test_batch_norm_needs_two_rows_in_the_last_batch(cli, no_fit, tmp_path):
    code, _, err = cli("train", "--data", "xor", "--split", "1,0,0", "--hidden", "4",
                       "--batch-norm", "after", "--batch-size", "3", "--out", tmp_path / "r")
    assert_user_error(code, err, "--batch-norm", "last batch of 1 row", "--batch-size 2")
    assert not no_fit and not (tmp_path / "r").exists()
    cli("train", "--data", "xor", "--split", "1,0,0", "--hidden", "4", "--batch-norm", "after",
        "--batch-size", "4", "--out", tmp_path / "r")
    assert len(no_fit) == 1  # one full batch of 4 rows: it trains


# -- gradient health and explain ----------------------------------------------------------
def test_monitor_writes_gradient_flow_and_logs_the_statistics(tmp_path):
    out = tmp_path / "run"
    run("train", "--data", "two_moons", "--hidden", "8,8", "--epochs", "2", "--monitor", "3",
        "--out", out, "--verbose", "0")
    png = (out / "gradient_flow.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    for key in ("grad/0/delta_rms", "grad/2/grad_norm", "grad/1/update_ratio",
                "grad/0/dead_fraction", "grad/depth_ratio"):
        assert key in header
    plain = tmp_path / "plain"  # without --monitor: no columns, no plot
    run("train", "--data", "two_moons", "--hidden", "8", "--epochs", "1", "--out", plain,
        "--verbose", "0")
    assert not (plain / "gradient_flow.png").exists()
    assert "grad/" not in (plain / "history.csv").read_text()


def test_monitor_warns_in_one_line_when_gradients_vanish(tmp_path):
    proc = run("train", "--data", "two_moons", "--hidden", ",".join(["16"] * 8),
               "--activation", "sigmoid", "--epochs", "1", "--monitor", "1", "--out",
               tmp_path / "deep", "--verbose", "0")
    lines = [ln for ln in proc.stderr.splitlines() if "vanish" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: GradientMonitor: the gradients "
                                                   "vanish")
    assert "He initialisation" in lines[0] and "Traceback" not in proc.stderr


def test_categorical_crossentropy_trains_a_softmax_output_and_predicts_its_probabilities(
        tmp_path):
    out = tmp_path / "cce"
    stdout = run("train", "--data", "two_moons", "--hidden", "8", "--epochs", "3",
                 "--loss", "categorical_crossentropy", "--out", out, "--verbose", "1").stdout
    assert "softmax output; the loss takes its logits" in stdout
    import backprop as bp

    ckpt = bp.load_checkpoint(out / "model.npz")
    assert ckpt.model.layers[-1].activation.kernel == "softmax"
    rows = list(csv.reader(run("predict", out / "model.npz", "--proba").stdout.splitlines()))
    proba = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (proba > 0).all()  # the outputs themselves, not a softmax of them (≥ e⁻¹/(1+e⁻¹))
    assert proba.max() > 0.75


def test_explain_a_fresh_model_prints_graph_equations_and_checks(tmp_path):
    dot = tmp_path / "g.dot"
    proc = run("explain", "--rows", "3", "--hidden", "5", "--activation", "relu", "--dot", dot)
    out = proc.stdout
    assert out.index("Forward (each node") < out.index("# Backpropagation on one batch")
    assert "δ0 = ∂L/∂Z0 = dA0 ⊙ σ′(Z0)" in out and "✓ All" in out and "✗" not in out
    assert dot.read_text().startswith("digraph")
    regression = run("explain", "--data", "regression", "--rows", "2", "--no-graph").stdout
    assert "MSELoss" in regression and "Forward (each node" not in regression


def test_explain_a_saved_model_uses_its_loss_and_data(trained):
    out, _ = trained
    proc = run("explain", out / "model.npz", "--rows", "2")
    assert "Dense(2, 16, activation='tanh')" in proc.stdout and "✓ All" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--rows", "1000"], "at most 256 rows"),
    (["--loss", "mse"], "is a regression loss, but digits is a classification data set"),
    (["no-such.npz"], "no checkpoint at"),
    (["--hidden", "x"], "--hidden"),
])
def test_explain_usage_errors(tmp_path, args, message):
    proc = run("explain", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_explain_refuses_fresh_model_options_for_a_saved_model(trained):
    out, _ = trained
    proc = run("explain", out / "model.npz", "--hidden", "4", check=False)
    assert proc.returncode == 2 and "--hidden describes a fresh model" in proc.stderr


# ---------------------------------------------------------------------------------------
# export: a saved model as ONNX (the inference graph of predict, raw features in)
def _onnx_outputs(path, X, name="input"):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {name: np.ascontiguousarray(X, dtype=np.float32)})[0]


def _onnx_props(path):
    import onnx

    proto = onnx.load(str(path))
    return proto, {p.key: p.value for p in proto.metadata_props}


def _training_data(ckpt):
    """The raw feature rows of a built-in data set, as train loaded them."""
    from backprop import data

    seed = ckpt.extra["data"]["seed"]
    if ckpt.extra["data"]["name"] == "two_moons":
        return data.two_moons(n=400, noise=0.15, seed=seed)[0]
    return data.regression(n=1000, features=8, noise=0.1, seed=seed)[0]


def test_export_a_classifier_takes_raw_features_and_matches_predict(cli, trained, tmp_path):
    pytest.importorskip("onnx")
    import backprop as bp

    model = trained[0] / "model.npz"
    code, out, err = cli("export", model, tmp_path / "m.onnx")
    assert code == 0, err
    assert "wrote" in out and "2 raw feature columns" in out and "logits" in out
    ckpt = bp.load_checkpoint(model)
    X = _training_data(ckpt)
    Xs = ((X - ckpt.extra["mean"]) / ckpt.extra["std"]).astype(np.float32)
    np.testing.assert_allclose(_onnx_outputs(tmp_path / "m.onnx", X), ckpt.model.predict(Xs),
                               rtol=1e-5, atol=1e-5)
    # --proba: the probabilities that predict --proba prints (to its 6 significant digits)
    code, out, err = cli("export", model, tmp_path / "p.onnx", "--proba")
    assert code == 0 and "probabilities of the classes ['0', '1']" in out, err
    code, out, err = cli("predict", model, "--proba", "--split", "all")
    assert code == 0, err
    rows = list(csv.reader(out.splitlines()))[1:]
    printed = np.array([[float(v) for v in r[1:]] for r in rows])
    proba = _onnx_outputs(tmp_path / "p.onnx", X)
    np.testing.assert_allclose(proba, printed, atol=2e-6)
    assert [str(k) for k in proba.argmax(axis=1)] == [r[0] for r in rows]
    proto, props = _onnx_props(tmp_path / "p.onnx")
    assert json.loads(props["backprop.classes"]) == ["0", "1"]
    assert json.loads(props["backprop.features"]) == ["x0", "x1"]
    assert props["backprop.output"] == "probabilities" and props["backprop.task"] == \
        "classification"
    assert [n.op_type for n in proto.graph.node][:2] == ["Sub", "Div"]


def test_export_raw_is_the_network_alone(cli, trained, tmp_path):
    pytest.importorskip("onnx")
    import backprop as bp

    model = trained[0] / "model.npz"
    code, out, err = cli("export", model, tmp_path / "r.onnx", "--raw", "--opset", "20",
                         "--dtype", "float64", "--input-name", "x", "--output-name", "logits")
    assert code == 0 and "opset 20, float64" in out and "standardised features" in out, err
    proto, props = _onnx_props(tmp_path / "r.onnx")
    assert proto.opset_import[0].version == 20 and props["backprop.input"] == \
        "standardised features"
    assert proto.graph.input[0].type.tensor_type.elem_type == 11  # DOUBLE
    ckpt = bp.load_checkpoint(model)
    X = np.random.default_rng(0).normal(size=(5, 2))
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"x": X})[0]
    np.testing.assert_allclose(got, ckpt.model.predict(X.astype(np.float32)), rtol=1e-5,
                               atol=1e-5)


def test_export_a_regression_model_predicts_in_the_targets_units(cli, regression_model,
                                                                  tmp_path):
    pytest.importorskip("onnx")
    code, out, err = cli("export", regression_model, tmp_path / "reg.onnx")
    assert code == 0 and "predictions of 'y' in its units" in out, err
    code, out, err = cli("predict", regression_model, "--split", "all")
    assert code == 0, err
    printed = np.array([float(v) for v in out.split()[1:]])
    import backprop as bp

    X = _training_data(bp.load_checkpoint(regression_model))
    got = _onnx_outputs(tmp_path / "reg.onnx", X)[:, 0]
    np.testing.assert_allclose(got, printed, rtol=1e-5, atol=1e-4 * np.abs(printed).max())
    _, props = _onnx_props(tmp_path / "reg.onnx")
    assert props["backprop.output"] == "predictions" and "backprop.classes" not in props


@pytest.mark.parametrize("loss, ops", [("nll", ["LogSoftmax", "Softmax"]),
                                       ("categorical_crossentropy", ["Softmax"])])
def test_export_proba_of_log_softmax_and_softmax_outputs(cli, tmp_path, loss, ops):
    pytest.importorskip("onnx")
    _train_ok(cli, tmp_path / "r", "--loss", loss)
    code, out, err = cli("export", tmp_path / "r" / "model.npz", tmp_path / "p.onnx", "--proba")
    assert code == 0, err
    proto, _ = _onnx_props(tmp_path / "p.onnx")
    tail = [n.op_type for n in proto.graph.node if "softmax" in n.op_type.lower()]
    assert tail == ops  # a softmax output is not softmaxed twice
    X = np.random.default_rng(1).normal(size=(6, 2))
    proba = _onnx_outputs(tmp_path / "p.onnx", X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    code, out, err = cli("export", tmp_path / "r" / "model.npz", tmp_path / "l.onnx")
    assert code == 0 and {"nll": "log-probabilities", "categorical_crossentropy":
                          "probabilities"}[loss] in out, err


def test_export_a_library_checkpoint(cli, tmp_path):
    pytest.importorskip("onnx")
    import backprop as bp

    model = bp.Sequential([bp.Flatten(), bp.Dense(6, 3, activation="sigmoid", rng=0)])
    bp.save(model, tmp_path / "lib.npz")
    code, _, err = cli("export", tmp_path / "lib.npz", tmp_path / "lib.onnx")
    assert_user_error(code, err, "--input-shape")
    code, _, err = cli("export", tmp_path / "lib.npz", tmp_path / "lib.onnx",
                       "--input-shape", "2,3", "--proba")
    assert_user_error(code, err, "--proba", "sigmoid")
    assert not (tmp_path / "lib.onnx").exists()
    code, out, err = cli("export", tmp_path / "lib.npz", tmp_path / "lib.onnx",
                         "--input-shape", "2,3")
    assert code == 0 and "(N, 2, 3)" in out and "the network's outputs" in out, err
    X = np.random.default_rng(0).normal(size=(4, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(_onnx_outputs(tmp_path / "lib.onnx", X), model.eval()(X),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, fragments", [
    (["{model}", "{dir}/m.onnx", "--opset", "12"], ["--opset", "13 to"]),
    (["{model}", "{dir}/m.onnx", "--opset", "x"], ["--opset"]),
    (["{model}", "{dir}/m.onnx", "--raw", "--proba"], ["--proba", "--raw"]),
    (["{model}", "{dir}/m.onnx", "--input-shape", "0"], ["--input-shape", "3,4"]),
    (["{model}", "{dir}/m.onnx", "--dtype", "float16"], ["--dtype"]),
    (["{model}", "{dir}/m.onnx", "--input-name", "y", "--output-name", "y"],
     ["--input-name"]),
    (["{model}"], ["output"]),
    (["{dir}/none.npz", "{dir}/m.onnx"], ["no checkpoint"]),
    (["{dir}", "{dir}/m.onnx"], ["is a directory", "model.npz"]),
    (["{garbage}", "{dir}/m.onnx"], ["not a backprop checkpoint"]),
    (["{model}", "{dir}"], ["is a directory", "model.onnx"]),
    (["{model}", "{nodir}"], ["does not exist"]),
    (["{model}", "{model}"], ["checkpoint itself"]),
    (["{regression}", "{dir}/m.onnx", "--proba"], ["--proba", "regression"]),
])
def test_export_usage_errors(cli, files, args, fragments):
    if "{garbage}" in args or "{regression}" in args:
        pytest.importorskip("onnx")  # found after the onnx check
    code, _, err = cli("export", *[a.format(**files) for a in args])
    assert_user_error(code, err, *fragments)
    assert not os.path.exists(files["dir"] / "m.onnx")


def test_export_without_onnx_exits_2_with_the_pip_hint(cli, files, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    code, _, err = cli("export", files["model"], tmp_path / "m.onnx")
    assert_user_error(code, err, "pip install 'backprop[onnx]'")
    # and in a fresh process whose onnx cannot be imported (a PYTHONPATH shim)
    shim = tmp_path / "shim" / "onnx"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'onnx'\")\n")
    env = {**CPU_ENV, "PYTHONPATH": os.pathsep.join([str(shim.parent), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "backprop", "export", str(files["model"]),
                           str(tmp_path / "m.onnx")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "pip install 'backprop[onnx]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_export_in_a_subprocess(trained, tmp_path):
    pytest.importorskip("onnx")
    proc = run("export", trained[0] / "model.npz", tmp_path / "m.onnx", "--opset", "13")
    assert proc.stdout.startswith("wrote ") and "opset 13" in proc.stdout
    assert (tmp_path / "m.onnx").stat().st_size > 100
    assert "export" in run("--help").stdout
