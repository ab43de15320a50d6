"""The demo: the same short training with attackers, once with plain averaging and once with BTARD.

    ./run demo                      # 8 CPU peers, 3 of them sign-flipping attackers from step 100
    ./run demo --attack LabelFlipping --byzantine 2 5

Each run is a real ``btard fit`` over ``configs/demo.yaml`` (one process per peer, gloo). BTARD runs
with verification on (its default): validators recompute a random peer's gradient every step, so the
attackers are caught and banned, and leave. The demo prints which peers attacked, each ban as it
happens, the ban list, BTARD's per-step clipping and both runs' test accuracy side by side, and
writes a plot of the test accuracy over the steps with the attack's start marked.
It trains on CIFAR-10 when ``<data-dir>/cifar-10-batches-py`` holds it (or it can be downloaded);
otherwise on a SYNTHETIC stand-in in CIFAR-10's on-disk format, and says so.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from lightning_btard.cli import CONFIGS
from lightning_btard.extras import require
from lightning_btard.run_results import read_bans, read_metrics

_CLONE = Path(__file__).resolve().parent.parent
ROOT = _CLONE if (_CLONE / "pyproject.toml").is_file() else Path.cwd()
"""Where data/ and runs/ go: the clone's root when run from a clone, else the current directory (installed package)."""
ATTACKS = ("SignFlipping", "RandomDirection", "LabelFlipping", "DelayedGradient", "InnerProductManipulation", "ALittleIsEnough")


def find_data(data_dir: Path, allow_download: bool) -> tuple[Path, bool]:
    """Where the demo's CIFAR-10 lives, and whether it is the synthetic stand-in."""
    from datamodules import write_synthetic_cifar10
    from datamodules.cifar10 import SYNTHETIC_SIZE

    if (data_dir / "cifar-10-batches-py" / "data_batch_1").exists() and not (data_dir / "cifar-10-batches-py" / "SYNTHETIC").exists():
        return data_dir, False
    if allow_download:
        try:
            torchvision = require("torchvision", "the demo's CIFAR-10 download")
            torchvision.datasets.CIFAR10(str(data_dir), train=True, download=True)
            torchvision.datasets.CIFAR10(str(data_dir), train=False, download=True)
            return data_dir, False
        except Exception as e:  # noqa: BLE001 - offline is the expected failure; we say what we do instead
            print(f"[demo] could not download CIFAR-10 ({type(e).__name__}: {str(e)[:120]})")
    synthetic = data_dir / "synthetic"
    write_synthetic_cifar10(synthetic, **SYNTHETIC_SIZE)
    return synthetic, True


def run_config(args: argparse.Namespace, mode: str, data_dir: Path, run_dir: Path) -> dict:
    """The per-run YAML laid over configs/demo.yaml."""
    aggregator = "mean" if mode == "mean" else "centered_clip"
    attack = {
        "class_path": f"lightning_btard.attacks.{args.attack}",
        "init_args": {"byzantine": args.byzantine, "attack_start": args.attack_start, "attack_every": 1},
    }
    return {
        "trainer": {
            "devices": args.peers,
            "max_steps": args.steps,
            "default_root_dir": str(run_dir),
            "strategy": {"class_path": "lightning_btard.BTARDStrategy", "init_args": {"tau": args.tau, "aggregator": aggregator}},
            "logger": [
                {"class_path": "TensorBoardLogger", "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}},
                {"class_path": "CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}},
            ],
            "callbacks": [attack] if args.byzantine else [],
            "enable_checkpointing": False,
        },
        "data": {"init_args": {"data_dir": str(data_dir), "download": False}},
    }


def train(args: argparse.Namespace, mode: str, data_dir: Path, out: Path) -> Path:
    """One ``btard fit`` run; its full output goes to ``<run>/train.log``, attack and error lines to the console."""
    run_dir = out / mode
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*run_dir.glob("metrics.csv"), *run_dir.glob("**/btard_events/*.jsonl")]:
        stale.unlink()
    (run_dir / "run.yaml").write_text(yaml.safe_dump(run_config(args, mode, data_dir, run_dir), sort_keys=False))
    cmd = [sys.executable, "-m", "lightning_btard.cli", "fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(run_dir / "run.yaml")]
    label = "plain averaging (aggregator=mean)" if mode == "mean" else f"BTARD (CenteredClip, tau={args.tau}, verified, 1 validator per step)"
    print(f"\n[demo] training with {label}: {args.peers} peers, {args.steps} steps  (log: {run_dir / 'train.log'})", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.time()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if _worth_showing(line):
                print("   " + line.rstrip(), flush=True)
        proc.wait()
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text().splitlines()[-25:]
        raise SystemExit(f"[demo] the {mode} run failed (exit {proc.returncode}); last lines of its log:\n" + "\n".join(tail))
    print(f"[demo] done in {time.time() - start:.0f}s", flush=True)
    return run_dir / "metrics.csv"


def _worth_showing(line: str) -> bool:
    """Attacks firing, bans (once, from the banned peer and from the final list), errors."""
    return any(key in line for key in (" fired at step ", "was banned at step", "banned during the run", "Error", "error:")) or (
        line.startswith("  step ") and " peer " in line
    )


def ban_list(run_dir: Path) -> list[str]:
    """The ban list rank 0 (never an attacker here) saw, from its event file (``protocol/events.py``)."""
    if not list(run_dir.glob("**/btard_events/rank0.jsonl")):
        return []
    bans = read_bans(run_dir)
    return [f"BTARD: {len(bans)} peer(s) banned during the run" + (":" if bans else ".")] + [
        f"  step {e['step']:>6}  peer {e['peers'][0]:>3}  {e['reason']} [{e['evidence']}]" for e in bans
    ]


def plot(curves: dict[str, dict[int, float]], attack_start: int, title: str, path: Path) -> None:
    matplotlib = require("matplotlib", "the demo's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, series in curves.items():
        steps = sorted(series)
        ax.plot(steps, [series[s] for s in steps], marker="o", markersize=3, label=label)
    ax.axvline(attack_start, color="red", linestyle="--", linewidth=1, label=f"attack starts (step {attack_start})")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args: argparse.Namespace, metrics: dict[str, dict[str, dict[int, float]]], synthetic: bool, out: Path) -> None:
    acc_key = "val/acc"
    mean_acc, btard_acc = metrics["mean"].get(acc_key, {}), metrics["btard"].get(acc_key, {})
    clipped = metrics["btard"].get("btard/clipped", {})
    active = metrics["btard"].get("btard/peers", {})
    iters = metrics["btard"].get("btard/cc_iterations", {})
    fired = metrics["mean"].get(f"attack/{args.attack}", {})  # nobody is banned in the plain-averaging run
    print("\n" + "=" * 78)
    print(f"data: {'SYNTHETIC CIFAR-10-format stand-in (CIFAR-10 itself is not on this machine)' if synthetic else 'CIFAR-10'}")
    print(f"peers: {args.peers}; attackers: {args.byzantine} ({args.attack}, from step {args.attack_start})")
    if fired:
        after = [v for s, v in fired.items() if s >= args.attack_start]
        print(f"peers firing {args.attack} per logged step after its start: {min(after, default=0):.0f}..{max(after, default=0):.0f}")
    print("\nBTARD's bans:")
    for line in ban_list(out / "btard") or ["  (no ban list found in the log)"]:
        print("  " + line.strip())
    print("\nstep | test acc: mean | test acc: BTARD | BTARD peers | BTARD clipped parts (of peers x parts) | CenteredClip iters")
    for step in sorted(set(mean_acc) | set(btard_acc)):
        near = min(clipped, key=lambda s: abs(s - step), default=None)
        n = active.get(near, args.peers) if near is not None else args.peers
        c = f"{clipped[near]:.0f} of {int(n) ** 2}" if near is not None else "-"
        it = f"{iters[near]:.0f}" if near is not None else "-"
        peers = f"{n:.0f}" if near is not None else "-"
        flag = "  <- attack on" if step >= args.attack_start else ""
        print(f"{step:4d} | {mean_acc.get(step, math.nan):14.3f} | {btard_acc.get(step, math.nan):15.3f} | {peers:>11} | {c:>38} | {it:>5}{flag}")
    final_mean = mean_acc[max(mean_acc)] if mean_acc else math.nan
    final_btard = btard_acc[max(btard_acc)] if btard_acc else math.nan
    print(f"\nfinal test accuracy: plain averaging {final_mean:.3f} | BTARD {final_btard:.3f}")
    png = out / "demo_accuracy.png"
    data_name = "synthetic CIFAR-10 stand-in" if synthetic else "CIFAR-10"
    plot(
        {"plain averaging": mean_acc, f"BTARD (tau={args.tau})": btard_acc},
        args.attack_start,
        f"{args.peers} peers, {len(args.byzantine)} {args.attack} attackers, {data_name}",
        png,
    )
    print(f"plot: {png}")
    print("TensorBoard: tensorboard --logdir " + str(out))
    print("=" * 78)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=8)
    p.add_argument("--byzantine", type=int, nargs="*", default=[1, 3, 6], help="attacking ranks (not 0)")
    p.add_argument("--attack", choices=ATTACKS, default="SignFlipping")
    p.add_argument("--attack-start", type=int, default=100)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--data-dir", type=Path, default=ROOT / "data")
    p.add_argument("--download", action="store_true", help="try to download CIFAR-10 when it is not in --data-dir")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    args = p.parse_args(argv)
    if any(not 0 < r < args.peers for r in args.byzantine):
        p.error(f"--byzantine ranks must be in 1..{args.peers - 1} (rank 0 hosts the process group)")
    if 2 * len(args.byzantine) >= args.peers:
        p.error("BTARD assumes fewer than half of the peers are Byzantine")
    data_dir, synthetic = find_data(args.data_dir, args.download)
    if synthetic:
        print("\n" + "!" * 78)
        print("! DATA: no CIFAR-10 here (offline). This demo trains on a SYNTHETIC stand-in written in CIFAR-10's")
        print(f"! on-disk format at {data_dir}: 10 classes of noisy shifted colour templates. Numbers are NOT CIFAR-10's.")
        print("! Put cifar-10-batches-py under --data-dir (or pass --download when online) to use the real data.")
        print("!" * 78)
    else:
        print(f"[demo] data: CIFAR-10 from {data_dir}")
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = {mode: read_metrics(train(args, mode, data_dir, args.out)) for mode in ("mean", "btard")}
    report(args, metrics, synthetic, args.out)


if __name__ == "__main__":
    main()
