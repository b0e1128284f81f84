"""The benchmark report: pytest-benchmark JSON (+ torch_compare JSON) → markdown and a PNG.

``python benchmarks/report.py RESULTS_DIR`` reads
``RESULTS_DIR/benchmark.json`` (written by ``pytest benchmarks/ --benchmark-only
--benchmark-json=...``) and ``RESULTS_DIR/torch.json`` when present, and writes
``report.md`` and ``report.png`` there. What it derives, per device:

- copy bandwidth ``B`` = the best of the device's 64 MB copies (bytes read + written / time);
- each kernel's achieved bandwidth = its minimum bytes / time, and that as a fraction of ``B``;
- speed-ups: fused backend over the reference, GPU over CPU (best backend of each);
- the training-step floor = the step's matrix products alone (measured) + the step's minimum
  epilogue and optimizer bytes moved at ``B``; and the step's time as a multiple of it;
- the ratio of the backprop step to the PyTorch step, each timed in its own process.

``--machine`` prints this machine's description (CPU model, cores, BLAS, GPU, versions) as
JSON, ``--slug`` a short name for it (``ci/bench.sh`` names result folders with it). The CPU
model comes from py-cpuinfo, which pytest-benchmark itself uses for its ``machine_info``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: its folder holds the benchmark modules
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

STATS = ("median", "min", "mean")
PLAIN_STORES = "numba_plain_stores"  # the copy with ordinary stores (benchmarks/test_bench_copy.py)
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
              "NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
              "BACKPROP_BLAS_POOL")


# ---------------------------------------------------------------------------------------
# The machine
def _cpu_model() -> str:
    """The CPU's brand string, as pytest-benchmark's ``machine_info["cpu"]`` records it."""
    try:
        import cpuinfo  # py-cpuinfo, a dependency of pytest-benchmark

        return cpuinfo.get_cpu_info().get("brand_raw") or platform.machine()
    except Exception:  # noqa: BLE001 - not installed, or it cannot read this machine
        return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _blas() -> str:
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception as exc:  # numpy < 1.25 or an unusual build
        return f"unknown ({type(exc).__name__})"
    config = deps.get("openblas configuration", "")
    return f"{deps.get('name')} {deps.get('version')}" + (f" ({config.strip()})" if config else "")


def describe_machine() -> dict:
    """CPU model, cores, memory, BLAS, GPU and library versions of this machine."""
    from backprop.backend import cuda_status

    status = cuda_status()
    threads = None
    if importlib.util.find_spec("numba") is not None:
        import numba

        threads = numba.get_num_threads()
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "numba_threads": threads,
        "thread_env": {v: os.environ[v] for v in THREAD_ENV if os.environ.get(v)},
        "blas": _blas(),
        "gpu": status["names"][0] if status["available"] else None,
        "gpu_reason": status["reason"],
        "cuda_driver": status["driver_version"],
        "cuda_runtime": status["runtime_version"],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": _version("numba"),
        "numba_cuda": _version("numba-cuda"),
        "cupy": status["cupy_version"],
        "torch": _version("torch"),
        "os": platform.platform(),
    }


def machine_slug(desc: dict | None = None) -> str:
    """A short file-name-safe name: CPU model, usable cores, and the GPU when there is one."""
    desc = desc or describe_machine()
    cpu = re.sub(r"\((r|tm)\)|cpu|processor|@.*$|\d+-core", "", desc["cpu"], flags=re.I)
    parts = [cpu, f"{desc['usable_cpus']}c"] + ([desc["gpu"]] if desc.get("gpu") else [])
    slug = re.sub(r"[^a-z0-9]+", "-", " ".join(parts).lower()).strip("-")
    return slug[:60].rstrip("-")


# ---------------------------------------------------------------------------------------
# Reading results
def load_benchmarks(path: Path, stat: str = "median") -> tuple[list[dict], dict]:
    """The rows of a pytest-benchmark JSON (``extra_info`` + ``time`` in seconds) and its
    machine description."""
    data = json.loads(Path(path).read_text())
    rows = []
    for b in data.get("benchmarks", []):
        row = dict(b.get("extra_info", {}))
        row.update(name=b["name"], group=b.get("group") or "", time=b["stats"][stat],
                   rounds=b["stats"].get("rounds"))
        rows.append(row)
    info = data.get("machine_info", {})
    machine = dict(info.get("backprop") or {})
    if "cpu" not in machine and isinstance(info.get("cpu"), dict):  # pytest-benchmark's own
        machine["cpu"] = info["cpu"].get("brand_raw")
    return rows, machine


def copy_bandwidths(rows: list[dict], method: str | None = None) -> dict[str, float]:
    """Best copy bandwidth per device, bytes/s (of one copy ``method`` when given, e.g.
    ``numba_plain_stores``: the ceiling of a kernel that writes with ordinary stores)."""
    best: dict[str, float] = {}
    for r in rows:
        if r.get("kind") == "copy" and method in (None, r.get("method")):
            best[r["device"]] = max(best.get(r["device"], 0.0), r["bytes"] / r["time"])
    return best


def step_over_floor(step: dict, bandwidth: dict[str, float]) -> float | None:
    """A step's time over its floor, from the step and matmul-floor medians the step
    benchmark timed alternately (``interleaved``), None when it has none."""
    pair = step.get("interleaved")
    if not pair or step["device"] not in bandwidth:
        return None
    moved = step["epilogue_bytes"] + step["optimizer_bytes"]
    return pair["step"] / (pair["matmul_floor"] + moved / bandwidth[step["device"]])


def step_floors(rows: list[dict], bandwidth: dict[str, float]) -> dict[tuple[str, str], float]:
    """(device, model) → floor seconds: matmuls alone + minimum other bytes at copy speed."""
    steps = {(r["device"], r["model"]): r for r in rows if r.get("kind") == "step"}
    floors = {}
    for r in rows:
        if r.get("kind") != "matmul_floor":
            continue
        key = (r["device"], r["model"])
        step = steps.get(key)
        if step is None or r["device"] not in bandwidth:
            floors[key] = r["time"]
        else:
            moved = step["epilogue_bytes"] + step["optimizer_bytes"]
            floors[key] = r["time"] + moved / bandwidth[r["device"]]
    return floors


# ---------------------------------------------------------------------------------------
# Markdown
def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds >= 0.1:
        return f"{seconds * 1e3:.0f}"
    if seconds >= 0.001:
        return f"{seconds * 1e3:.2f}"
    return f"{seconds * 1e3:.4f}"


def _x(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "_No results of this kind in the run._"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _target(r: dict) -> str:
    return f"{r['device']}/{r['backend']}"


def machine_section(machine: dict) -> str:
    if not machine:
        return "_No machine description in the JSON._"
    keys = ["cpu", "logical_cpus", "physical_cores", "usable_cpus", "numba_threads", "thread_env",
            "memory_gib", "blas", "gpu", "gpu_reason", "cuda_driver", "cuda_runtime", "python",
            "numpy", "numba", "numba_cuda", "cupy", "torch", "os"]
    return _table(["", "value"], [[k, machine.get(k)] for k in keys if k in machine])


def step_section(rows: list[dict], bandwidth: dict, torch_rows: list[dict]) -> str:
    floors = step_floors(rows, bandwidth)
    steps = [r for r in rows if r.get("kind") == "step"]
    torch_time = {(t["device"], t["model"]): t["time"] for t in torch_rows
                  if t["framework"] == "torch"}
    bp_iso = {(t["device"], t["model"]): t["time"] for t in torch_rows
              if t["framework"] == "backprop"}
    best_cpu = {r["model"]: min(s["time"] for s in steps
                                if s["model"] == r["model"] and s["device"] == "cpu")
                for r in steps if r["device"] == "cpu"}
    ref = {(r["device"], r["model"]): r["time"] for r in steps if r["backend"] == "reference"}
    out = []
    for r in sorted(steps, key=lambda r: (r["params"], r["device"], r["backend"])):
        key = (r["device"], r["model"])
        floor = floors.get(key)
        torch_t = torch_time.get(key)
        iso = bp_iso.get(key)
        out.append([
            r["model"], " → ".join(map(str, r["sizes"])), r["batch"], _target(r), _ms(r["time"]),
            f"{r['batch'] / r['time']:,.0f}", _ms(floor),
            _x(step_over_floor(r, bandwidth) or (r["time"] / floor if floor else None)),
            _x(ref[key] / r["time"]) if key in ref and r["backend"] != "reference" else "–",
            _x(best_cpu[r["model"]] / r["time"])
            if r["device"] != "cpu" and r["model"] in best_cpu else "–",
            _ms(torch_t), _x(iso / torch_t) if iso and torch_t else "–"])
    text = _table(["model", "sizes", "batch", "device/kernels", "step ms", "samples/s",
                   "floor ms", "step/floor", "vs reference", "GPU vs best CPU",
                   "torch ms", "backprop/torch"], out)
    return text + (
        "\n\n*floor* = the step's matrix products alone (measured, `out=` buffers) + its minimum "
        "epilogue, loss and Adam bytes at the device's copy bandwidth. *step/floor* comes from "
        "the step and its matrix products timed alternately in the step's benchmark (the two "
        "benchmarks' own medians, taken at different moments, are not comparable on a "
        "shared machine). *vs reference* = "
        "reference-kernel step time / this step time. *backprop/torch* compares the two "
        "frameworks timed by `torch_compare.py`, each in its own process with the same "
        "thread count, PyTorch at the faster of its default and `OMP_WAIT_POLICY=active` "
        "(>1× means backprop is slower).")


def copy_section(rows: list[dict]) -> str:
    out = [[r["device"], r["method"], f"{r['bytes'] / r['time'] / 1e9:.1f}"]
           for r in rows if r.get("kind") == "copy"]
    return _table(["device", "copy", "GB/s (read + write)"], out)


def kernel_section(rows: list[dict], bandwidth: dict) -> str:
    plain = copy_bandwidths(rows, PLAIN_STORES)
    kernels = [r for r in rows if r.get("kind") == "kernel"]
    ref = {(r["group"], r["device"]): r["time"] for r in kernels if r["backend"] == "reference"}
    best_cpu: dict[str, float] = {}
    for r in kernels:
        if r["device"] == "cpu":
            best_cpu[r["group"]] = min(best_cpu.get(r["group"], r["time"]), r["time"])
    out = []
    for r in sorted(kernels, key=lambda r: (r["group"], r["device"], r["backend"])):
        gbs = r["bytes"] / r["time"]
        bw = bandwidth.get(r["device"])
        speedup = ref.get((r["group"], r["device"]))
        out.append([r["group"].removeprefix("kernel:"), _target(r), _ms(r["time"]),
                    f"{gbs / 1e9:.1f}", f"{gbs / bw:.0%}" if bw else "–",
                    f"{gbs / plain[r['device']]:.0%}" if r["device"] in plain else "–",
                    f"{r['flops'] / r['time'] / 1e9:.1f}",
                    _x(speedup / r["time"]) if speedup and r["backend"] != "reference" else "–",
                    _x(best_cpu[r["group"]] / r["time"])
                    if r["device"] != "cpu" and r["group"] in best_cpu else "–"])
    return _table(["op:shape", "device/kernels", "ms", "GB/s", "of copy BW",
                   "of plain-store copy", "GFLOP/s", "vs reference", "GPU vs best CPU"], out)


def render_markdown(rows: list[dict], machine: dict, torch_rows: list[dict], stat: str,
                    chart: str | None) -> str:
    bandwidth = copy_bandwidths(rows)
    parts = [
        "# backprop benchmarks", "",
        f"Times are the {stat} over rounds (pytest-benchmark), float32. Devices or kernel "
        "backends that could not run on this machine are absent (the pytest log lists them as "
        "skipped, with the reason).", "",
        "## Machine", "", machine_section(machine), "",
        "## Training step (zero_grad, forward, softmax cross-entropy, backward, Adam)", "",
        step_section(rows, bandwidth, torch_rows), "",
        "## Copy bandwidth", "", copy_section(rows), "",
        "## Kernels", "",
        "GB/s from the minimum bytes an op must move (inputs read once, outputs written once); "
        "*of copy BW* divides it by the best copy bandwidth of the device. The best CPU copy "
        "is a `memcpy`, whose string moves may write whole cache lines without reading them "
        "first; a kernel writes with ordinary vector stores, so *of plain-store copy* divides "
        "by a copy loop that does the same (`numba_plain_stores`). GFLOP/s counts one per "
        "arithmetic operation or transcendental (nominal).", "",
        kernel_section(rows, bandwidth), ""]
    if chart:
        parts += [f"![benchmark chart]({chart})", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# Chart
def render_chart(rows: list[dict], torch_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bandwidth = copy_bandwidths(rows)
    floors = step_floors(rows, bandwidth)
    fig, axes = plt.subplots(2, 1, figsize=(12, 10))

    steps = [r for r in rows if r.get("kind") == "step"]
    models = sorted({r["model"] for r in steps}, key=lambda m: next(
        r["params"] for r in steps if r["model"] == m))
    series: dict[str, dict[str, float]] = {}
    for r in steps:
        series.setdefault(_target(r), {})[r["model"]] = r["time"]
    for (device, model), t in floors.items():
        series.setdefault(f"{device} floor", {})[model] = t
    for t in torch_rows:
        if t["framework"] == "torch":
            series.setdefault(f"{t['device']}/torch", {})[t["model"]] = t["time"]
    _bars(axes[0], models, series, scale=1e3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms per training step (log)")
    axes[0].set_title("Training step: backprop kernels, matmul+bandwidth floor, PyTorch")

    kernels = [r for r in rows if r.get("kind") == "kernel"
               and r["device"] in bandwidth and r.get("shape") and
               np.prod(r["shape"]) == max(np.prod(k["shape"]) for k in rows
                                          if k.get("kind") == "kernel" and k["op"] == r["op"])]
    names = sorted({r["group"].split(":")[1] for r in kernels})
    kseries: dict[str, dict[str, float]] = {}
    for r in kernels:
        kseries.setdefault(_target(r), {})[r["group"].split(":")[1]] = \
            r["bytes"] / r["time"] / bandwidth[r["device"]]
    if not kseries:
        axes[1].text(0.5, 0.5, "no kernel results in this run", ha="center",
                     transform=axes[1].transAxes)
    _bars(axes[1], names, kseries, scale=1.0)
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_ylabel("achieved bandwidth / copy bandwidth")
    axes[1].set_title("Kernels (largest shape): fraction of the device's copy bandwidth")
    axes[1].tick_params(axis="x", rotation=30)
    for label in axes[1].get_xticklabels():
        label.set_horizontalalignment("right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, categories: list[str], series: dict[str, dict[str, float]], scale: float) -> None:
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(categories))
    for i, (label, values) in enumerate(sorted(series.items())):
        heights = [values.get(c, np.nan) * scale for c in categories]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label)
    ax.set_xticks(x, categories)
    if series:
        ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)


# ---------------------------------------------------------------------------------------
# Entry point
def write_report(benchmark_jsons: list[Path], torch_json: Path | None, out_dir: Path,
                 stat: str = "median", plot: bool = True) -> Path:
    """Write ``report.md`` (and ``report.png``) into ``out_dir`` from one or more
    pytest-benchmark JSON files of one machine (e.g. a GPU run and a CPU run); returns the
    markdown path."""
    rows, machine = [], {}
    for path in benchmark_jsons:
        more, described = load_benchmarks(path, stat)
        rows += more
        machine = machine or described
    if not rows:
        raise ValueError(f"{', '.join(map(str, benchmark_jsons))} hold no benchmark results: run "
                         "the suite with --benchmark-only --benchmark-json=FILE (not "
                         "--benchmark-disable)")
    torch_rows = []
    if torch_json is not None and torch_json.exists():
        torch_rows = [dict(r, time=r[stat]) for r in json.loads(torch_json.read_text())["results"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = None
    if plot:
        render_chart(rows, torch_rows, out_dir / "report.png")
        chart = "report.png"
    md = out_dir / "report.md"
    md.write_text(render_markdown(rows, machine or describe_machine(), torch_rows, stat, chart))
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/report.py",
        description="Turn benchmark results (pytest-benchmark JSON, torch_compare JSON) into "
                    "a markdown report and a PNG chart; run the suite with ci/bench.sh.")
    parser.add_argument("results", nargs="?", type=Path,
                        help="folder with benchmark*.json (and torch.json); the report goes there")
    parser.add_argument("--benchmark-json", type=Path, nargs="+",
                        help="pytest-benchmark JSON files of one machine")
    parser.add_argument("--torch-json", type=Path, help="torch_compare.py JSON file")
    parser.add_argument("--out", type=Path, help="folder for report.md and report.png")
    parser.add_argument("--stat", choices=STATS, default="median", help="statistic to report")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    parser.add_argument("--machine", action="store_true",
                        help="print this machine's description as JSON and exit")
    parser.add_argument("--slug", action="store_true",
                        help="print a short name for this machine and exit")
    args = parser.parse_args(argv)
    if args.machine:
        print(json.dumps(describe_machine(), indent=2))
        return 0
    if args.slug:
        print(machine_slug())
        return 0
    bench_jsons = args.benchmark_json or (
        sorted(args.results.glob("benchmark*.json")) if args.results else None)
    if bench_jsons is None:
        parser.error("give a results folder or --benchmark-json FILE")
    if not bench_jsons or not all(p.exists() for p in bench_jsons):
        where = bench_jsons or [args.results / "benchmark.json"]
        parser.error(f"{', '.join(map(str, where))}: no such file: run ci/bench.sh, or pytest "
                     f"benchmarks/ --benchmark-only --benchmark-json={where[0]}")
    torch_json = args.torch_json or (args.results / "torch.json" if args.results else None)
    out = args.out or args.results or bench_jsons[0].parent
    md = write_report(bench_jsons, torch_json, out, args.stat, plot=not args.no_plot)
    print(f"wrote {md}" + ("" if args.no_plot else f" and {md.with_suffix('.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
