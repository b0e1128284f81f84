"""Data-parallel training (backprop.distributed, backprop.data_parallel).

The multi-rank tests start real MPI jobs (``mpiexec -n 2`` and ``-n 3``) of
``tests/distributed_worker.py`` and compare them with the same script run as one process.
The design's proof is the equivalence: with no dropout and no per-rank BatchNorm, N ranks end
with the parameters of one process, in float64 to 1e-9, with uneven shares (37 rows in
global batches of 12: the last batch has 1 row, so some ranks get none).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import backprop as bp
from backprop import distributed
from backprop.data_parallel import DataParallel

WORKER = str(Path(__file__).with_name("distributed_worker.py"))
TIMEOUT = 120  # seconds for one job; a hang fails the test instead of stalling CI


def _mpiexec() -> str | None:
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _mpi_unavailable() -> str:
    """Why MPI jobs cannot run here ("" when they can): mpi4py, mpiexec, and a 2-process
    job that starts and meets at a barrier."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'backprop[mpi]')"
    if _mpiexec() is None:
        return "no mpiexec beside the Python interpreter or on PATH (pip install mpich)"
    probe = [_mpiexec(), "-n", "2", sys.executable, "-c",
             "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"]
    try:
        out = subprocess.run(probe, capture_output=True, text=True, timeout=60,
                             env=_clean_env())
    except subprocess.TimeoutExpired:
        return "a 2-process MPI job did not start within 60 s"
    if out.returncode != 0:
        return f"a 2-process MPI job cannot start: {(out.stderr or out.stdout).strip()[-300:]}"
    return ""


@pytest.fixture(scope="session")
def mpi_available():
    reason = _mpi_unavailable()
    if reason:
        pytest.skip(reason)


needs_mpi = pytest.mark.usefixtures("mpi_available")


def _clean_env() -> dict:
    """The environment without any MPI launcher's variables (for the one-process runs)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_LOCAL", "HYDRA_"))}


def run_job(ranks: int, *args, check=True, env=None):
    """Run the worker on ``ranks`` MPI processes (0: as a plain process, no launcher)."""
    cmd = [sys.executable, WORKER, *map(str, args)]
    if ranks:
        cmd = [_mpiexec(), "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**_clean_env(), **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


def result(proc) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone reports
    return json.loads(lines[0][len("RESULT "):])


def train(tmp_path, ranks: int, name: str, env=None, **options) -> tuple[dict, dict]:
    out = tmp_path / f"{name}.npz"
    args = ["train", "--out", out]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", value]
    res = result(run_job(ranks, *args, env=env))
    with np.load(out) as f:
        return res, {k: f[k] for k in f.files}


def assert_same(a: dict, b: dict, tol: float) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=tol, err_msg=key)


# ---------------------------------------------------------------------------------------
# Without MPI
def test_plan_and_local_index_cover_every_row_once_across_the_ranks():
    order = np.random.default_rng(3).permutation(37)
    steps = 4  # batches of 12: 12, 12, 12, 1
    for world in (1, 2, 3, 5):
        seen = []
        for rank in range(world):
            dp = DataParallel.__new__(DataParallel)
            dp.rank, dp.size = rank, world
            plan = dp.plan(37, 12, steps)
            seen.append(DataParallel.local_index(order, plan))
            assert [rows for *_, rows in plan] == [12, 12, 12, 1]
        merged = np.concatenate(seen)
        assert sorted(merged.tolist()) == list(range(37))


def test_without_a_launcher_init_makes_a_one_process_group_without_importing_mpi4py():
    code = ("import sys, backprop as bp; assert 'mpi4py' not in sys.modules; "
            "g = bp.distributed.init(); assert 'mpi4py' not in sys.modules; "
            "print(g.size, g.rank, bp.distributed.world_size(), bp.distributed.info()['transport'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_clean_env(), timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0", "1", "none"]


def test_collectives_before_init_say_to_call_init(monkeypatch):
    monkeypatch.setattr(distributed, "_group", None)
    assert distributed.rank() == 0 and distributed.world_size() == 1
    assert not distributed.is_initialized()
    with pytest.raises(RuntimeError, match=r"distributed.init\(\)"):
        distributed.allreduce(np.zeros(3))


def test_one_process_group_collectives_are_identities(monkeypatch):
    monkeypatch.setattr(distributed, "_group", None)
    group = distributed.init(mpi=False)
    assert distributed.current_group() is group and group.size == 1
    a = np.arange(4.0)
    assert distributed.allreduce(a, op="mean") is a and a.tolist() == [0, 1, 2, 3]
    assert distributed.allreduce(2.5, op="sum") == 2.5
    assert distributed.broadcast(a) is a
    assert distributed.allgather_object("x") == ["x"]
    with pytest.raises(ValueError, match="op must be"):
        distributed.allreduce(a, op="avg")
    with pytest.raises(ValueError, match="C-contiguous"):
        distributed.allreduce(np.zeros((3, 3))[:, 1])
    # fit on a one-process group is the ordinary fit
    X, y = bp.data.two_moons(64, seed=0)
    bp.manual_seed(0)
    m = bp.Sequential([bp.Dense(2, 8, activation="tanh"), bp.Dense(8, 2)])
    m.fit(X, y, loss="cross_entropy", epochs=1, batch_size=16, seed=0, verbose=0)


def test_dropout_streams_draw_different_masks_and_stream_zero_is_the_default():
    x = np.ones((8, 64))
    masks = []
    for stream in (0, 1, 2):
        d = bp.Dropout(0.5, seed=11)
        d.stream = stream
        masks.append(d.forward(x).copy())
    plain = bp.Dropout(0.5, seed=11).forward(x)
    np.testing.assert_array_equal(masks[0], plain)
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


def test_metric_states_merge_into_the_metric_of_all_rows():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 50), rng.normal(size=(50, 3))
    yr, pr = rng.normal(size=(50, 2)), rng.normal(size=(50, 2))
    for make, (t, q) in ((bp.metrics.Accuracy, (y, p)), (bp.metrics.R2Score, (yr, pr)),
                         (bp.metrics.MeanAbsoluteError, (yr, pr)),
                         (lambda: bp.metrics.ConfusionMatrix(3), (y, p))):
        whole, parts = make(), [make(), make(), make()]
        whole.update(t, q)
        for part, (lo, hi) in zip(parts, [(0, 20), (20, 50), (50, 50)]):
            if hi > lo:
                part.update(t[lo:hi], q[lo:hi])
        states = [part.state() for part in parts]
        parts[2].merge(states)  # the rank that saw no rows ends with everyone's result
        np.testing.assert_allclose(parts[2].result(), whole.result(), rtol=1e-12)


def test_batch_rows_check_counts_each_ranks_share():
    from backprop.training import _check_batch_rows

    model = bp.Sequential([bp.Dense(3, 4), bp.BatchNorm1d(4)])
    _check_batch_rows(model, 40, 8, True, world=4)  # 2 rows per rank: enough
    with pytest.raises(ValueError, match="on every rank"):
        _check_batch_rows(model, 40, 8, True, world=5)


def test_sync_batchnorm_on_one_process_is_batchnorm_and_round_trips():
    X = np.random.default_rng(0).normal(size=(16, 4))
    a, b = bp.BatchNorm1d(4, dtype="float64"), bp.SyncBatchNorm(4, dtype="float64")
    np.testing.assert_array_equal(a.forward(X), b.forward(X))
    g = np.random.default_rng(1).normal(size=(16, 4))
    np.testing.assert_array_equal(a.backward(g.copy()), b.backward(g.copy()))
    rebuilt = bp.layers.from_config(b.config())
    assert type(rebuilt) is bp.SyncBatchNorm and rebuilt.num_features == 4


# ---------------------------------------------------------------------------------------
# MPI jobs
@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_collectives_on_ranks(ranks):
    res = result(run_job(ranks, "primitives"))
    assert res["size"] == ranks and res["sum_ok"] and res["mean_ok"] and res["bcast_ok"]
    assert res["scalar"] == ranks * (ranks + 1) / 2
    assert res["gathered"] == list(range(ranks))
    assert "C-contiguous" in res["strided"]
    assert res["info"]["transport"] == "mpi" and res["info"]["size"] == ranks
    # the node's cores divided between its ranks (all on this machine)
    threads = max(1, res["cores"] // ranks)
    assert res["info"]["ranks_on_node"] == ranks and res["info"]["threads_per_rank"] == threads
    assert res["numba_threads"] == min(threads, int(os.environ.get("NUMBA_NUM_THREADS", 99)))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process reference runs, computed once for the module."""
    tmp = tmp_path_factory.mktemp("one-process")
    runs = {"mlp": train(tmp, 0, "mlp"), "syncbn": train(tmp, 0, "syncbn", config="syncbn"),
            "mlp5": train(tmp, 0, "mlp5", epochs=5)}
    return {k: v[1] for k, v in runs.items()}


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_n_ranks_end_with_the_parameters_of_one_process(tmp_path, one_process, ranks):
    res, state = train(tmp_path, ranks, "mlp")
    assert res["nonblocking_per_step"] == 1  # the loss; the gradient in one allreduce
    assert res["spread_between_ranks"] == 0.0  # every rank holds the same parameters
    assert_same(state, one_process["mlp"], tol=1e-9)  # params, loss, metrics, val_*


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_allreduce_in_buckets_during_backward_gives_the_same_parameters(tmp_path, one_process,
                                                                       ranks):
    # 512-byte buckets: the MLP's float64 gradient (3,352 bytes) goes out in two slices
    # started during backward, beside the loss's non-blocking sum: 3 per step
    res, state = train(tmp_path, ranks, "mlp", env={"BACKPROP_BUCKET_MB": str(512 / 2**20)})
    assert res["nonblocking_per_step"] == 3
    assert res["spread_between_ranks"] == 0.0  # every rank holds the same parameters
    assert_same(state, one_process["mlp"], tol=1e-9)  # params, loss, metrics, val_*


@needs_mpi
def test_a_loss_paired_with_the_softmax_output_on_2_ranks_in_buckets(tmp_path):
    """categorical_crossentropy on a softmax output takes the gradient at the logits; the
    bucketed backward must do the same on its last layer."""
    _, alone = train(tmp_path, 0, "softmax-1", config="softmax")
    res, state = train(tmp_path, 2, "softmax-2", config="softmax",
                       env={"BACKPROP_BUCKET_MB": str(256 / 2**20)})
    assert res["nonblocking_per_step"] == 3
    assert_same(state, alone, tol=1e-9)


@needs_mpi
@pytest.mark.parametrize("precision", ["fp16-mixed"])
def test_mixed_precision_on_2_ranks_in_buckets_follows_one_process(tmp_path, precision):
    """Every product in low precision (emulated: any CPU): the ranks stay equal (the
    loss-scale decisions, which every rank must share, included) and end near the
    one-process run (the float32 sums of ∂W run over each rank's rows, then across ranks: a
    different order, not other operands). fp16-mixed alone: it has both the low-precision
    products and the loss scaling; bf16-mixed differs only in the format of the products,
    which nothing in the data-parallel code sees (test_precision.py holds bf16-mixed in one
    process)."""
    env = {"BACKPROP_LOWP_EMULATE": "1", "BACKPROP_LOWP_MIN_MACS": "0",
           "BACKPROP_LOWP_MIN_INNER": "1"}
    _, alone = train(tmp_path, 0, "mp-1", env=env, dtype="float32", precision=precision)
    res, state = train(tmp_path, 2, "mp-2", dtype="float32", precision=precision,
                       env={**env, "BACKPROP_BUCKET_MB": str(512 / 2**20)})
    assert res["precision"] == precision
    assert res["spread_between_ranks"] == 0.0
    assert_same(state, alone, tol=2e-3)


@needs_mpi
def test_gradient_clipping_on_3_ranks_clips_the_global_gradient(tmp_path):
    _, alone = train(tmp_path, 0, "clip-1", clip_grad_norm=0.05)
    res, ranks = train(tmp_path, 3, "clip-3", clip_grad_norm=0.05)
    _, unclipped = train(tmp_path, 0, "noclip", epochs=3)
    assert res["spread_between_ranks"] == 0.0
    assert_same(ranks, alone, tol=1e-9)
    assert not np.allclose(alone["0.W"], unclipped["0.W"], rtol=0, atol=1e-6)  # it clipped


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_n_ranks_reading_npy_files_equal_one_process_in_memory(tmp_path, one_process, ranks):
    res, state = train(tmp_path, ranks, "mlp-npy", source=tmp_path)
    assert res["spread_between_ranks"] == 0.0
    assert_same(state, one_process["mlp"], tol=1e-9)


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batchnorm_on_n_ranks_equals_batchnorm_on_one_process(tmp_path, one_process,
                                                                   ranks):
    res, state = train(tmp_path, ranks, "syncbn", config="syncbn")
    assert res["spread_between_ranks"] == 0.0
    assert_same(state, one_process["syncbn"], tol=1e-9)  # running statistics included


@needs_mpi
@pytest.mark.parametrize("config", ["batchnorm", "dropout"])
def test_per_rank_batchnorm_and_dropout_keep_the_ranks_equal(tmp_path, config):
    res1, alone = train(tmp_path, 0, f"{config}-1", config=config)
    res2, two = train(tmp_path, 2, f"{config}-2", config=config)
    assert res2["spread_between_ranks"] == 0.0
    differs = [k for k in alone if not k.startswith("history.") and
               not np.allclose(alone[k], two[k], rtol=0, atol=1e-9)]
    assert differs, "per-rank statistics / masks should change the result"


@needs_mpi
def test_a_checkpoint_of_2_ranks_resumes_on_3_as_the_uninterrupted_run(tmp_path, one_process):
    ckpt = tmp_path / "ckpt.npz"
    train(tmp_path, 2, "first", epochs=2, checkpoint=ckpt)
    _, resumed = train(tmp_path, 3, "resumed", epochs=5, resume=ckpt)
    reference = one_process["mlp5"]
    params = [k for k in reference if not k.startswith("history.")]
    assert_same({k: resumed[k] for k in params}, {k: reference[k] for k in params}, tol=1e-9)
    np.testing.assert_allclose(resumed["history.loss"], reference["history.loss"][2:],
                               rtol=0, atol=1e-9)


@needs_mpi
def test_a_callback_error_on_one_rank_ends_the_job_with_its_message(tmp_path):
    ckpt = tmp_path / "ckpt.npz"
    proc = run_job(2, "fault", "callback", "--checkpoint", ckpt, check=False)
    assert proc.returncode != 0
    assert "rank 1 of 2 failed" in proc.stderr
    assert "callback failed on purpose at epoch 2" in proc.stderr
    if ckpt.exists():  # written by rank 0 only, never half-written
        assert bp.load_checkpoint(ckpt).epoch in (1, 2)


@needs_mpi
def test_a_killed_rank_ends_the_job():
    proc = run_job(2, "fault", "kill", check=False)
    assert proc.returncode != 0
    assert "FINISHED" not in proc.stdout


@needs_mpi
def test_bad_data_on_one_rank_fails_every_rank_before_training():
    proc = run_job(2, "fault", "bad-data", check=False)
    assert proc.returncode != 0
    assert "RANK 1 RAISED DataError: training data: X contains NaN" in proc.stdout
    assert "RANK 0 RAISED DistributedError: rank 1 of 2 failed" in proc.stdout
    assert "DataError" in proc.stdout.split("RANK 0 RAISED DistributedError")[1]


@needs_mpi
def test_a_check_that_only_rank_0_makes_fails_every_rank_without_an_abort():
    proc = run_job(2, "fault", "bad-checkpoint", check=False)
    assert proc.returncode != 0 and "MPI_Abort" not in proc.stderr, proc.stderr
    assert "RANK 0 RAISED" in proc.stdout and "ModelCheckpoint" in proc.stdout
    assert "RANK 1 RAISED DistributedError: rank 0 of 2 failed" in proc.stdout


@needs_mpi
def test_a_bad_argument_fails_every_rank_alike():
    proc = run_job(3, "fault", "bad-argument", check=False)
    for r in range(3):
        assert f"RANK {r} RAISED ValueError: validation_split" in proc.stdout


@needs_mpi
def test_a_non_finite_loss_stops_every_rank_at_the_same_step():
    proc = run_job(2, "nonfinite")
    # (the launcher may interleave the two ranks' lines, so match, not split)
    found = re.findall(r"RANK (\d) RAISED NonFiniteLossError: the loss became \S+ at epoch "
                       r"(\d+), step (\d+)", proc.stdout)
    assert sorted(r for r, *_ in found) == ["0", "1"], proc.stdout
    assert found[0][1:] == found[1][1:]  # the same epoch and step on both ranks


@needs_mpi
def test_cli_train_on_two_ranks_writes_once_and_reports_once(tmp_path):
    out = tmp_path / "run"
    cmd = [_mpiexec(), "-n", "2", sys.executable, "-m", "backprop", "train", "--data",
           "two_moons", "--hidden", "8", "--epochs", "2", "--out", str(out), "--no-plot"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                          env=_clean_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("saved ") == 1 and "2 MPI processes" in proc.stdout
    assert sorted(os.listdir(out)) == ["history.csv", "history.json", "model.npz"]
    assert bp.load_checkpoint(out / "model.npz").epoch == 2
    bad = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-m", "backprop", "train",
                          "--epochs", "0", "--out", str(out)],
                         capture_output=True, text=True, timeout=TIMEOUT, env=_clean_env())
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("error: argument --epochs") == 1, bad.stderr  # once, not per rank


@pytest.mark.filterwarnings(r"ignore:\s*nccl library could not be loaded:UserWarning")
def test_the_nccl_path_says_why_it_is_not_used_where_nccl_is_missing():
    from backprop.distributed import ProcessGroup

    group = ProcessGroup(None)
    try:
        from cupy.cuda import nccl
        available = getattr(nccl, "available", True)
    except Exception:  # noqa: BLE001 - no CuPy or a broken one: the path must say so too
        available = False
    if available:
        pytest.skip("NCCL is available here: ci/gpu.sh (ci/nccl_smoke.py) tests the path")
    assert group._nccl_comm() is None
    assert "nccl" in group.nccl_reason.lower()
    compile(Path(__file__).parents[1].joinpath("ci", "nccl_smoke.py").read_text(),
            "nccl_smoke.py", "exec")
