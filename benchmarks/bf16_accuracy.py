"""The README's main job (``python -m backprop train``, UCI digits) in float32 and in bf16
mixed precision: test accuracy and learning curves side by side.

    python benchmarks/bf16_accuracy.py [--seeds 0,1,2] [--epochs 30]
        [--out-md benchmarks/results/<machine>-<date>/bf16_accuracy.md]
        [--plot docs/bf16_curves.png] [--runs-dir DIR] [--threads N]

Per seed, three runs of the CLI, each in its own process, into ``--runs-dir`` (a temporary
folder unless given), with the documented main-job options (``ci/demo.sh``'s, which are the
CLI's defaults) and the same ``--seed`` (data split, initial weights, shuffling):

- ``float32``;
- ``bf16-default``: ``--precision bf16-mixed`` with the default per-product thresholds (at
  the main job's widths and batch of 64 no product reaches them, so it should match
  float32: what a user asking for bf16 on this model gets);
- ``bf16-all``: ``--precision bf16-mixed`` with ``BACKPROP_LOWP_MIN_MACS=0
  BACKPROP_LOWP_MIN_INNER=1``, every product in bf16 (the numerics of the mode on this
  model, whatever its speed).

The test metrics and the precision that really ran come from each run's checkpoint
(``extra["test"]``, ``extra["precision"]``), the curves from its ``history.json``. Writes a
Markdown table (per seed and mean ± standard deviation of the differences to float32), the
same data as JSON beside it, and a figure of the training loss, validation loss and
validation accuracy per epoch (mean over the seeds, the band their range). Where bf16 is
not fast here the CLI falls back to float32 with a warning, the checkpoint says
``float32``, and the table says so; ``BACKPROP_LOWP_EMULATE=1`` (or
``BACKPROP_BF16_GEMM=emulate``) in the environment emulates the mode's numerics instead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MD = HERE / "results" / "intel-xeon-2c-2026-12-05" / "bf16_accuracy.md"
DEFAULT_PLOT = ROOT / "docs" / "bf16_curves.png"
# The main job of the README and ci/demo.sh (--seed and --out are added per run).
MAIN_JOB = ["--data", "digits", "--hidden", "128,64", "--activation", "relu",
            "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "64", "--device", "auto"]
CONFIGS = {
    "float32": ([], {}),
    "bf16-default": (["--precision", "bf16-mixed"], {}),
    "bf16-all": (["--precision", "bf16-mixed"],
                 {"BACKPROP_LOWP_MIN_MACS": "0", "BACKPROP_LOWP_MIN_INNER": "1"}),
}
_THRESHOLD_VARS = ("BACKPROP_LOWP_MIN_MACS", "BACKPROP_LOWP_MIN_INNER", "BACKPROP_PRECISION")


def run_config(name: str, seed: int, epochs: int, runs_dir: Path, threads: int | None) -> dict:
    """One CLI run; its checkpoint's test metrics and precision, and its history."""
    flags, env_extra = CONFIGS[name]
    out = runs_dir / f"{name}-seed{seed}"
    env = dict(os.environ)
    for var in _THRESHOLD_VARS:  # each configuration sets exactly what it names
        env.pop(var, None)
    env.update(env_extra)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS"):
            env[var] = str(threads)
    cmd = [sys.executable, "-m", "backprop", "train", *MAIN_JOB, "--epochs", str(epochs),
           "--seed", str(seed), "--out", str(out), "--no-plot", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    from backprop import io

    checkpoint = io.load_checkpoint(str(out / "model.npz"))
    history = json.loads((out / "history.json").read_text())
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    return {"config": name, "seed": seed, "test": checkpoint.extra["test"],
            "precision": checkpoint.extra.get("precision"), "history": history,
            "seconds": seconds, "warnings": warnings,
            "command": " ".join(f"{k}={v}" for k, v in env_extra.items()).strip()
            + (" " if env_extra else "") + "python -m backprop train "
            + " ".join(cmd[4:]).replace(str(out), f"runs/{out.name}")}


def products_in_bf16(batch: int = 64, sizes=(64, 128, 64, 10)) -> dict:
    """How many of the main job's products (per full batch) each configuration runs in
    bf16 (the thresholds' rule, :meth:`backprop.precision.Policy.lowp`)."""
    from backprop.precision import MIN_INNER, MIN_MACS

    out = {}
    for name, (macs, inner) in (("bf16-default", (MIN_MACS, MIN_INNER)), ("bf16-all", (0, 1))):
        count = total = 0
        for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:])):
            shapes = [(batch, o, i), (o, i, batch)] + ([(batch, i, o)] if k else [])
            for m, n, kk in shapes:
                total += 1
                count += kk >= inner and m * n * kk >= macs
        out[name] = (count, total)
    out["float32"] = (0, out["bf16-all"][1])
    return out


def _mean_sd(values) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> dict:
    by = {(r["config"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out = {"seeds": seeds, "configs": {}}
    for name in CONFIGS:
        acc = [by[name, s]["test"]["accuracy"] for s in seeds]
        row = {"accuracy": acc, "mean": _mean_sd(acc),
               "loss": [by[name, s]["test"]["loss"] for s in seeds],
               "precision": sorted({str(by[name, s]["precision"]) for s in seeds})}
        if name != "float32":
            diff = [100 * (a - by["float32", s]["test"]["accuracy"]) for a, s in zip(acc, seeds)]
            row["diff_points"] = diff
            row["diff_mean_sd"] = _mean_sd(diff)
            row["diff_range"] = (min(diff), max(diff))
            row["within_half_point"] = abs(row["diff_mean_sd"][0]) <= 0.5
        out["configs"][name] = row
    return out


def render(data: dict) -> str:
    s, cfg = data["summary"], data["summary"]["configs"]
    bf = data.get("bf16") or {}
    lines = ["# bf16 mixed precision: accuracy of the main job (UCI digits)", "",
             "Command:", "", f"    {data['command']}", "",
             "Each run is the README's main job, `python -m backprop train --data digits "
             "--hidden 128,64 --activation relu --optimizer adam --lr 1e-3 --epochs "
             f"{data['epochs']} --batch-size 64 --seed S` (the CLI's defaults), one process "
             "each: `float32`; `bf16-default`: `--precision bf16-mixed` with the default "
             "per-product thresholds; `bf16-all`: the same with `BACKPROP_LOWP_MIN_MACS=0 "
             "BACKPROP_LOWP_MIN_INNER=1` (every product in bf16). The same seed gives the "
             "same split, initial weights and shuffling in the three. Test split: 269 "
             "rows (one row = 0.37 points), evaluated after training as the CLI does (the "
             "float32 master weights, outside the autocast region).", ""]
    if bf:
        lines += [f"bf16 here: {bf.get('reason')}." if bf.get("fast") else
                  f"**bf16 is not fast here ({bf.get('reason')}): the bf16 runs fell back "
                  "to float32 (see the precision column).**", ""]
    counts = data["products"]
    lines += ["Products in bf16 per full batch of 64 (of all the step's products): "
              + ", ".join(f"`{k}` {c}/{t}" for k, (c, t) in counts.items()) + ".", "",
              "Test accuracy (%):", "",
              "| seed | " + " | ".join(CONFIGS) + " | bf16-default − float32 "
              "| bf16-all − float32 |", "|---:|" + "---:|" * (len(CONFIGS) + 2)]
    for i, seed in enumerate(s["seeds"]):
        cells = [f"{100 * cfg[n]['accuracy'][i]:.2f}" for n in CONFIGS]
        diffs = [f"{cfg[n]['diff_points'][i]:+.2f}" for n in CONFIGS if n != "float32"]
        lines.append(f"| {seed} | " + " | ".join(cells + diffs) + " |")
    means = [f"{100 * cfg[n]['mean'][0]:.2f} ± {100 * cfg[n]['mean'][1]:.2f}" for n in CONFIGS]
    dm = [f"{cfg[n]['diff_mean_sd'][0]:+.2f} ± {cfg[n]['diff_mean_sd'][1]:.2f}"
          for n in CONFIGS if n != "float32"]
    lines += ["| mean ± sd | " + " | ".join(means + dm) + " |", "",
              "Test loss (the runs differ even where the accuracy is the same):", "",
              "| seed | " + " | ".join(CONFIGS) + " |", "|---:|" + "---:|" * len(CONFIGS)]
    for i, seed in enumerate(s["seeds"]):
        lines.append(f"| {seed} | " + " | ".join(f"{cfg[n]['loss'][i]:.4f}" for n in CONFIGS)
                     + " |")
    lines.append("")
    for n in CONFIGS:
        if n == "float32":
            continue
        c = cfg[n]
        lines.append(f"- `{n}` − `float32`: {c['diff_mean_sd'][0]:+.2f} ± "
                     f"{c['diff_mean_sd'][1]:.2f} points (range {c['diff_range'][0]:+.2f} to "
                     f"{c['diff_range'][1]:+.2f}) over {len(s['seeds'])} seed(s): "
                     f"{'within' if c['within_half_point'] else 'OUTSIDE'} the issue's "
                     "±0.5 points; precision that ran: " + ", ".join(c["precision"]) + ".")
    lines += ["", "Final epoch per configuration (mean over the seeds): training loss, "
              "validation loss, validation accuracy, and the median wall time of an epoch "
              "after the first (Numba compiles in the first; a noisy figure on a shared "
              "machine):", "",
              "| configuration | loss | val_loss | val_accuracy | s/epoch |",
              "|---|---:|---:|---:|---:|"]
    for n in CONFIGS:
        hs = [r["history"] for r in data["runs"] if r["config"] == n]
        last = {k: statistics.fmean(h[k][-1] for h in hs)
                for k in ("loss", "val_loss", "val_accuracy")}
        epoch = statistics.median(t for h in hs for t in h["time"][1:])
        lines.append(f"| {n} | {last['loss']:.4f} | {last['val_loss']:.4f} | "
                     f"{100 * last['val_accuracy']:.2f} % | {epoch:.3f} |")
    if data.get("plot"):
        lines += ["", f"Curves: `{data['plot']}` (mean over the seeds, band: their range)."]
    warned = sorted({w for r in data["runs"] for w in r["warnings"]})
    if warned:
        lines += ["", "Warnings printed by the runs:", ""] + [f"- {w}" for w in warned]
    lines += ["", "One run's command per configuration:", ""]
    for n in CONFIGS:
        r = next(r for r in data["runs"] if r["config"] == n)
        lines.append(f"    {r['command']}")
    lines.append("")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bf16_accuracy: matplotlib is not installed: no figure")
        return None
    import numpy as np

    panels = (("loss", "training loss"), ("val_loss", "validation loss"),
              ("val_accuracy", "validation accuracy"))
    styles = {"float32": ("tab:blue", "-"), "bf16-default": ("tab:orange", "--"),
              "bf16-all": ("tab:red", ":")}
    curves = {name: {key: np.array([r["history"][key] for r in sorted(
        (r for r in data["runs"] if r["config"] == name), key=lambda r: r["seed"])])
        for key, _ in panels} for name in CONFIGS}
    # the curves lie on top of each other at this scale: the second row shows each bf16
    # run against the float32 run of its seed
    fig, axes = plt.subplots(2, len(panels), figsize=(13, 7), sharex=True)
    for col, (key, title) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        ref = curves["float32"][key]
        epochs = np.arange(1, ref.shape[1] + 1)
        for name in CONFIGS:
            c = curves[name][key]
            color, style = styles[name]
            top.plot(epochs, c.mean(0), style, color=color, lw=1.8, label=name)
            if len(c) > 1:
                top.fill_between(epochs, c.min(0), c.max(0), color=color, alpha=0.12, lw=0)
            if name == "float32":
                continue
            diff = 100 * (c - ref) if key == "val_accuracy" else 100 * (c - ref) / ref
            bottom.plot(epochs, diff.mean(0), style, color=color, lw=1.8, label=name)
            if len(diff) > 1:
                bottom.fill_between(epochs, diff.min(0), diff.max(0), color=color,
                                    alpha=0.15, lw=0)
        top.set_title(title)
        bottom.axhline(0.0, color="tab:blue", lw=0.8)
        bottom.set_title(f"{title}: bf16 − float32")
        bottom.set_ylabel("points" if key == "val_accuracy" else "% of float32")
        bottom.set_xlabel("epoch")
        if key.endswith("loss"):
            top.set_yscale("log")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="lower right")
    seeds = data["summary"]["seeds"]
    fig.suptitle(f"UCI digits main job, float32 vs bf16-mixed (mean over seeds "
                 f"{', '.join(map(str, seeds))}; band: their range)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out-md", type=Path, default=DEFAULT_MD,
                        help="Markdown table (a .json of the same data beside it)")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="figure (PNG)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="where the CLI runs write (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=None,
                        help="thread counts for the runs (default: the environment's)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds or args.epochs < 1:
        parser.error("need at least one seed and one epoch")
    from backprop import bf16

    command = "python benchmarks/bf16_accuracy.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        runs = []
        for seed in seeds:
            for name in CONFIGS:
                run = run_config(name, seed, args.epochs, runs_dir, args.threads)
                runs.append(run)
                print(f"bf16_accuracy: seed {seed} {name}: test accuracy "
                      f"{100 * run['test']['accuracy']:.2f} % (precision {run['precision']}, "
                      f"{run['seconds']:.1f} s)")
    data = {"command": command.strip(), "epochs": args.epochs, "bf16": bf16.bf16_support(),
            "products": products_in_bf16(), "runs": runs, "summary": summarize(runs)}
    figure = plot(data, args.plot)
    if figure is not None:
        try:
            data["plot"] = str(figure.resolve().relative_to(ROOT))
        except ValueError:
            data["plot"] = str(figure)
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(render(data))
    args.out_md.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(f"bf16_accuracy: wrote {args.out_md}" + (f" and {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
