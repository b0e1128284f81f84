"""backprop.blas_pool: OpenBLAS's parallel jobs on Numba's OpenMP threads.

Every check runs in a fresh process with a time limit: the pool is installed once per
process, and a mistake in how the jobs are run shows as a hang (the jobs of one product wait
for each other), which the limit turns into a failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

TIMEOUT = 240


def _run(code: str, **env) -> dict:
    """Run ``code`` in a fresh process (without the OpenMP settings this process got from
    importing backprop, so that the child makes its own) and parse its last line."""
    from backprop.kernels import OMP_VARIABLES

    base = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    # two threads in both pools on any machine: OpenBLAS splits the products below in two
    # (on one core it would not), and no more than Numba has (else nothing is installed);
    # the Dense layers' products on OpenBLAS even where MKL is installed (backprop.gemm)
    base.update(NUMBA_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2", OMP_NUM_THREADS="2",
                BACKPROP_GEMM="numpy")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=TIMEOUT, env={**base, **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_PRELUDE = """
    import json, threading
    import numba, numpy as np
    import backprop as bp
    from backprop import blas_pool

    def installed_by_training():
        # a Dense layer large enough for OpenBLAS's threads: its forward pass installs
        model = bp.Sequential([bp.Dense(512, 512, activation="relu"), bp.Dense(512, 10)])
        x = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
        model.forward(x)
        model.backward(np.ones((256, 10), np.float32))
        return blas_pool.active()

    active = installed_by_training()
    out = {"active": active, "status": blas_pool.status()}
"""


def _skip_unless_installed(result):
    if not result["active"]:
        pytest.skip(f"the shared pool is not available here: {result['status']}")


def test_products_run_on_the_pool_and_give_the_same_bits():
    result = _run(_PRELUDE + """
    if active:
        rng = np.random.default_rng(1)
        cases = [(rng.standard_normal((256, 700)).astype(np.float32),
                  rng.standard_normal((700, 900)).astype(np.float32)),
                 (rng.standard_normal((300, 500)), rng.standard_normal((500, 400))),
                 (rng.standard_normal((800, 64)).astype(np.float32).T,
                  rng.standard_normal((800, 600)).astype(np.float32))]
        from backprop.kernels import numba_cpu

        calls = blas_pool.pool_calls()
        shared = [a @ b for a, b in cases]
        out["pool_calls"] = blas_pool.pool_calls() - calls
        out["threshold_shared"] = numba_cpu.PARALLEL_MIN_ELEMENTS == \
            numba_cpu.PARALLEL_MIN_ELEMENTS_SHARED_POOL
        blas_pool.uninstall()
        out["threshold_own"] = numba_cpu.PARALLEL_MIN_ELEMENTS == \
            numba_cpu.PARALLEL_MIN_ELEMENTS_OWN_POOLS
        own = [a @ b for a, b in cases]
        out["same_bits"] = all(np.array_equal(s, o) for s, o in zip(shared, own))
        out["close_to_float64"] = all(
            np.allclose(s, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)
            for s, (a, b) in zip(shared, cases))
        out["reinstalled"] = blas_pool.install()
    print(json.dumps(out))
    """)
    _skip_unless_installed(result)
    assert result["pool_calls"] >= 3
    assert result["threshold_shared"] and result["threshold_own"]
    assert result["same_bits"] and result["close_to_float64"]
    assert result["reinstalled"]


def test_more_jobs_than_numba_threads_go_to_openblas_workers():
    """OpenBLAS raised above Numba's thread count (here by threadpoolctl): the jobs cannot
    all get a thread of the pool, so OpenBLAS's own workers run them."""
    result = _run(_PRELUDE + """
    from threadpoolctl import threadpool_limits
    if active:
        rng = np.random.default_rng(2)
        a = rng.standard_normal((512, 512)).astype(np.float32)
        b = rng.standard_normal((512, 512)).astype(np.float32)
        expected = a @ b
        before = blas_pool.delegated_calls()
        with threadpool_limits(numba.config.NUMBA_NUM_THREADS + 2, user_api="blas"):
            got = a @ b
        out["delegated"] = blas_pool.delegated_calls() - before
        out["equal"] = bool(np.array_equal(got, expected) or np.allclose(got, expected,
                                                                          rtol=1e-5))
        out["still_active"] = blas_pool.active()
    print(json.dumps(out))
    """)
    _skip_unless_installed(result)
    assert result["delegated"] >= 1
    assert result["equal"] and result["still_active"]


def test_calling_thread_keeps_its_numba_thread_count_and_threads_share_the_pool():
    result = _run(_PRELUDE + """
    if active:
        rng = np.random.default_rng(3)
        pairs = []  # products of several shapes, every other one with a transposed operand
        for k, (m, inner, n) in enumerate([(256, 1024, 512), (512, 256, 700),
                                           (300, 400, 500), (128, 784, 256)]):
            a = rng.standard_normal((inner, m)).astype(np.float32).T if k % 2 else \
                rng.standard_normal((m, inner)).astype(np.float32)
            pairs.append((a, rng.standard_normal((inner, n)).astype(np.float32)))
        expected = [a @ b for a, b in pairs]
        # a thread limited to one Numba thread still gets every job of a product at once
        numba.set_num_threads(1)
        got = pairs[0][0] @ pairs[0][1]
        out["restored"] = numba.get_num_threads() == 1
        out["one_thread_equal"] = bool(np.array_equal(got, expected[0]))
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        # four threads multiplying at once, each its own products, many times (the jobs of
        # concurrent products once shared OpenBLAS's per-thread packing buffers)
        bad = []
        def work(k):
            for _ in range(40):
                if not np.array_equal(pairs[k][0] @ pairs[k][1], expected[k]):
                    bad.append(k)
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        out["concurrent_bad"] = len(bad)
    print(json.dumps(out))
    """)
    _skip_unless_installed(result)
    assert result["restored"] and result["one_thread_equal"]
    assert result["concurrent_bad"] == 0


def test_the_nesting_guard_sees_a_parallel_region():
    """Inside a parallel region a nested one runs serially, so the callback must not use
    the pool there: its test, ``omp_in_parallel``, read inside and outside a region."""
    result = _run(_PRELUDE + """
    if active:
        from backprop.blas_pool import _in_parallel

        @numba.njit
        def outside():
            return _in_parallel()

        @numba.njit(parallel=True)
        def inside(flags):
            for i in numba.prange(flags.size):
                flags[i] = _in_parallel()

        flags = np.zeros(numba.config.NUMBA_NUM_THREADS * 4, np.int32)
        inside(flags)
        out["outside"] = int(outside())
        out["inside"] = flags.tolist()
    print(json.dumps(out))
    """)
    _skip_unless_installed(result)
    assert result["outside"] == 0
    assert all(f != 0 for f in result["inside"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_gets_openblas_workers_back():
    result = _run(_PRELUDE + """
    import multiprocessing as mp
    if active:
        rng = np.random.default_rng(4)
        a = rng.standard_normal((400, 400)).astype(np.float32)
        expected = a @ a

        def child(queue):
            queue.put((blas_pool.active(), blas_pool.status(), bool(np.array_equal(a @ a,
                                                                             expected))))

        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(queue,))
        proc.start()
        out["child"] = queue.get(timeout=120)
        proc.join(60)
        out["parent_active"] = blas_pool.active()
    print(json.dumps(out))
    """)
    _skip_unless_installed(result)
    active, status, equal = result["child"]
    assert not active and "fork" in status and equal
    assert result["parent_active"]


def test_opt_out_keeps_openblas_pool_and_sleeping_openmp_threads():
    result = _run(_PRELUDE + """
    import os
    out.update(policy=os.environ.get("OMP_WAIT_POLICY"), spin=os.environ.get("GOMP_SPINCOUNT"))
    print(json.dumps(out))
    """, BACKPROP_BLAS_POOL="openblas")
    assert not result["active"]
    assert "BACKPROP_BLAS_POOL=openblas" in result["status"]
    assert result["policy"] == "PASSIVE" and result["spin"] is None


def test_installed_where_mkl_runs_the_products():
    """With the Dense products on MKL (backprop.gemm) no pass takes an OpenBLAS cap; the pool
    is installed all the same, so that OpenBLAS's own products (predict's NaN check, the
    caller's) do not leave its workers spinning against MKL's and the kernels' threads."""
    result = _run(_PRELUDE + """
    from backprop import gemm
    out["gemm"] = gemm.backend()
    print(json.dumps(out))
    """, BACKPROP_GEMM="auto")
    if result["gemm"] != "mkl":
        pytest.skip("MKL is not installed here: the products run on OpenBLAS")
    assert result["status"] != "not tried"  # (where it cannot be installed it says why)
    _skip_unless_installed(result)
