"""``btard sweep``: a grid of ``btard fit`` runs, their results in one table, and the paper's figures.

    btard sweep --config configs/sweeps/paper_resnet18_small.yaml [--jobs 2] [--out runs/sweeps/<name>]

A sweep config names the configs every cell starts from, the options every cell gets, and the axes of the grid;
each axis maps a label to the CLI options it adds (any ``btard fit`` option: attack, aggregator, tau, attackers,
attack start and period, data split, seed, ...)::

    name: my_sweep
    configs: [configs/demo.yaml]
    options: ["--trainer.max_steps=300", "--trainer.devices=8"]
    axes:
      attack:                       # the figures' rows
        none: []
        sign_flipping: ["--config", "configs/attacks/sign_flipping.yaml", "--trainer.callbacks.byzantine=[1,3,6]"]
      defence:                      # the figures' lines
        btard_tau1: ["--trainer.strategy.tau=1"]
        mean: ["--trainer.strategy.aggregator=mean"]
      seed:
        "0": ["--seed_everything=0"]
    attack_start: 100               # marked on the curves (optional)

Every cell runs in ``<out>/cells/<label>__<label>...`` (skipped when its ``result.json`` is there: an interrupted
sweep resumes), ``--jobs`` at a time. The results are ``<out>/results.csv`` and ``results.json`` (one row per cell:
final and best test accuracy, steps to the last ban, bans of honest peers, wall time) and two figures:
``curves.png`` (test accuracy over steps, one panel per value of the first axis, one line per value of the second,
averaged over the others: the paper's figure) and ``heatmap.png`` (final accuracy over the first two axes).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from lightning_btard.cli import packaged_configs
from lightning_btard.errors import UserError
from lightning_btard.extras import require
from lightning_btard.run_results import read_bans, read_metrics

__all__ = ["Cell", "Sweep", "main"]

ACCURACY = "val/acc"


@dataclass
class Cell:
    """One run of the grid: a label per axis and the CLI options they add."""

    labels: dict[str, str]
    options: list[str]

    @property
    def name(self) -> str:
        return "__".join(f"{label}" for label in self.labels.values())


@dataclass
class Result:
    labels: dict[str, str]
    status: str
    final_acc: float = math.nan
    best_acc: float = math.nan
    last_step: int = 0
    bans: list[int] = field(default_factory=list)
    honest_bans: list[int] = field(default_factory=list)
    steps_to_last_ban: Optional[int] = None
    seconds: float = 0.0


class Sweep:
    """A sweep config, read and checked (module docstring)."""

    def __init__(self, path: Path) -> None:
        spec = yaml.safe_load(Path(path).read_text())
        if not isinstance(spec, dict) or not isinstance(spec.get("axes"), dict) or not spec["axes"]:
            raise UserError(f"{path}: a sweep config needs 'axes': a mapping of axis -> {{label: [CLI options]}}")
        self.name = str(spec.get("name", Path(path).stem))
        self.configs = [str(c) for c in spec.get("configs", [])]
        self.options = [str(o) for o in spec.get("options", [])]
        self.attack_start = spec.get("attack_start")
        self.axes: dict[str, dict[str, list[str]]] = {}
        for axis, choices in spec["axes"].items():
            if not isinstance(choices, dict) or not choices:
                raise UserError(f"{path}: axis {axis!r} must map labels to lists of CLI options")
            self.axes[str(axis)] = {str(label): [str(o) for o in (opts or [])] for label, opts in choices.items()}

    def cells(self) -> list[Cell]:
        names = list(self.axes)
        return [
            Cell(dict(zip(names, labels)), [o for axis, label in zip(names, labels) for o in self.axes[axis][label]])
            for labels in itertools.product(*(self.axes[a] for a in names))
        ]

    def command(self, cell: Cell, cell_dir: Path) -> list[str]:
        configs = [x for c in self.configs for x in ("--config", c)]
        return [sys.executable, "-m", "lightning_btard.cli", "fit", *configs, *self.options, *cell.options,
                f"--trainer.default_root_dir={cell_dir}", "--trainer.logger=CSVLogger",
                f"--trainer.logger.save_dir={cell_dir}", "--trainer.logger.name=", "--trainer.logger.version=",
                "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cell(sweep: Sweep, cell: Cell, out: Path, timeout: Optional[float] = None) -> Result:
    """Run one cell (or read its result when it is done already); its processes are killed after ``timeout`` s."""
    cell_dir = out / "cells" / cell.name
    done = cell_dir / "result.json"
    if done.is_file():
        return Result(**json.loads(done.read_text()))
    cell_dir.mkdir(parents=True, exist_ok=True)
    for stale in cell_dir.glob("**/*"):
        if stale.is_file() and stale.name != "train.log":
            stale.unlink()
    start = time.time()
    cmd = packaged_configs(sweep.command(cell, cell_dir))
    (cell_dir / "command.json").write_text(json.dumps(cmd[1:], indent=1))
    # cells running side by side each need their own torch.distributed store
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore",
           "MASTER_PORT": str(_free_port())}
    with open(cell_dir / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc}; see {cell_dir / 'train.log'})"
        except subprocess.TimeoutExpired:
            rc, status = -1, f"timed out after {timeout:.0f}s (see {cell_dir / 'train.log'})"
        finally:  # every rank the cell launched
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    result = summarize(cell, cell_dir, status, time.time() - start)
    if rc == 0:
        done.write_text(json.dumps(asdict(result)))
    return result


def byzantine_of(cell_dir: Path) -> set[int]:
    """The attacking peers of a cell, from the config the CLI saved."""
    saved = next(iter(sorted(cell_dir.glob("**/config.yaml"))), None)
    if saved is None:
        return set()
    trainer = (yaml.safe_load(saved.read_text()) or {}).get("trainer", {})
    callbacks = trainer.get("callbacks") or []
    from lightning_btard.attacks.base import byzantine_ranks

    return {r for cb in callbacks if isinstance(cb, dict) for r in byzantine_ranks((cb.get("init_args") or {}).get("byzantine") or [])}


def summarize(cell: Cell, cell_dir: Path, status: str, seconds: float) -> Result:
    metrics_file = cell_dir / "metrics.csv"
    acc = read_metrics(metrics_file).get(ACCURACY, {}) if metrics_file.is_file() else {}
    bans = read_bans(cell_dir)
    banned = [int(e["peers"][0]) for e in bans]
    byzantine = byzantine_of(cell_dir)
    return Result(
        labels=cell.labels, status=status,
        final_acc=acc[max(acc)] if acc else math.nan, best_acc=max(acc.values()) if acc else math.nan,
        last_step=max(acc) if acc else 0, bans=banned, honest_bans=[p for p in banned if p not in byzantine],
        steps_to_last_ban=max((int(e["step"]) for e in bans), default=None), seconds=round(seconds, 1),
    )


def write_table(results: list[Result], out: Path) -> None:
    rows = [{**r.labels, **{k: v for k, v in asdict(r).items() if k != "labels"}} for r in results]
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in row.items()})


def _mean_curves(sweep: Sweep, out: Path, results: list[Result]) -> dict[tuple[str, str], dict[int, float]]:
    """(first-axis label, second-axis label) -> step -> test accuracy averaged over the other axes' cells."""
    rows, lines = list(sweep.axes)[0], list(sweep.axes)[1] if len(sweep.axes) > 1 else None
    sums: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in results:
        cell = Cell(r.labels, [])
        metrics_file = out / "cells" / cell.name / "metrics.csv"
        if r.status != "ok" or not metrics_file.is_file():
            continue
        key = (r.labels[rows], r.labels[lines] if lines else "")
        for step, value in read_metrics(metrics_file).get(ACCURACY, {}).items():
            sums.setdefault(key, {}).setdefault(step, []).append(value)
    return {k: {s: sum(v) / len(v) for s, v in series.items()} for k, series in sums.items()}


def draw(sweep: Sweep, results: list[Result], out: Path) -> list[Path]:
    """The curves (one panel per first-axis label, one line per second-axis label) and the heatmap."""
    matplotlib = require("matplotlib", "btard sweep's figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = list(sweep.axes)
    ran = [r.labels for r in results]  # the cells of this invocation (--only may select some)
    row_labels = [label for label in sweep.axes[axes[0]] if any(c[axes[0]] == label for c in ran)]
    line_labels = [label for label in sweep.axes[axes[1]] if any(c[axes[1]] == label for c in ran)] if len(axes) > 1 else [""]
    curves = _mean_curves(sweep, out, results)
    cols = min(3, len(row_labels))
    nrows = math.ceil(len(row_labels) / cols)
    fig, grid = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    for i, row in enumerate(row_labels):
        ax = grid[i // cols][i % cols]
        for line in line_labels:
            series = curves.get((row, line), {})
            if series:
                steps = sorted(series)
                ax.plot(steps, [series[s] for s in steps], label=line or row, linewidth=1.4)
        if sweep.attack_start is not None:
            ax.axvline(float(sweep.attack_start), color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{axes[0]}: {row}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("test accuracy", fontsize=8)
    for j in range(len(row_labels), nrows * cols):
        grid[j // cols][j % cols].axis("off")
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.suptitle(f"{sweep.name}: test accuracy", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    curves_png = out / "curves.png"
    fig.savefig(curves_png, dpi=110)
    plt.close(fig)

    final: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r.status == "ok" and not math.isnan(r.final_acc):
            final.setdefault((r.labels[axes[0]], r.labels[axes[1]] if len(axes) > 1 else ""), []).append(r.final_acc)
    table = [[sum(final.get((row, line), [math.nan])) / len(final.get((row, line), [1])) for line in line_labels] for row in row_labels]
    fig, ax = plt.subplots(figsize=(1.2 * len(line_labels) + 2.5, 0.5 * len(row_labels) + 1.8))
    image = ax.imshow(table, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(line_labels)), line_labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    for i, row_values in enumerate(table):
        for j, v in enumerate(row_values):
            ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if not math.isnan(v) and v < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="final test accuracy")
    ax.set_title(f"{sweep.name}: final test accuracy", fontsize=9)
    fig.tight_layout()
    heatmap_png = out / "heatmap.png"
    fig.savefig(heatmap_png, dpi=110)
    plt.close(fig)
    return [curves_png, heatmap_png]


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="btard sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the sweep's YAML (configs/sweeps/...)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (each is a multi-process training)")
    p.add_argument("--out", type=Path, default=None, help="where cells, the table and the figures go (default runs/sweeps/<name>)")
    p.add_argument("--only", default=None, help="run only the cells whose name contains one of these (comma-separated)")
    p.add_argument("--cell-timeout", type=float, default=None, help="seconds after which a cell is stopped (a failed cell)")
    args = p.parse_args(argv)
    config = Path(packaged_configs(["--config", args.config])[1])
    try:
        sweep = Sweep(config)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the sweep config {args.config}: {e}") from e
    out = args.out or Path("runs") / "sweeps" / sweep.name
    out.mkdir(parents=True, exist_ok=True)
    only = [part for part in (args.only or "").split(",") if part]
    cells = [c for c in sweep.cells() if not only or any(part in c.name for part in only)]
    print(f"[sweep] {sweep.name}: {len(cells)} cells over {' x '.join(f'{a} ({len(v)})' for a, v in sweep.axes.items())}, "
          f"{args.jobs} at a time; results in {out}", flush=True)
    start = time.time()

    def one(cell: Cell) -> Result:
        result = run_cell(sweep, cell, out, args.cell_timeout)
        print(f"[sweep] {cell.name}: {result.status}, final acc {result.final_acc:.3f}, bans {result.bans}"
              f"{' HONEST BANNED ' + str(result.honest_bans) if result.honest_bans else ''} ({result.seconds:.0f}s)", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, cells))
    write_table(results, out)
    figures = draw(sweep, results, out)
    failed = [r for r in results if r.status != "ok"]
    print(f"[sweep] done in {time.time() - start:.0f}s: {out / 'results.csv'}, {', '.join(map(str, figures))}"
          + (f"; {len(failed)} cell(s) failed" if failed else ""), flush=True)
    if failed:
        raise SystemExit(1)
