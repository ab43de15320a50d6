"""The hivemind swarm under churn and attack, for a long while: ``./run bench swarm_soak [--minutes 15] [--peers 6]``.

Loopback peers, each its own ``btard fit`` of ``configs/demo.yaml`` (on a synthetic CIFAR-10-format stand-in
written under the run directory), and on a schedule:

- rank ``P-2`` flips its gradient's sign from step 10 (validation bans it); it then starts again under a **new
  key** and is admitted (an open run is not Sybil-resistant), training honestly;
- rank ``P-1`` **withholds** its scatter messages from step ``--withhold-at`` (the reports of silence remove it);
- rank 1 is **killed** (SIGKILL) at step ``--crash-at`` and restarted with its own key (it asks to join again);
- a **late peer** starts a minute (``--late-after``) after training began;
- a **Sybil flood**: ``--sybils`` identities ask to join every 15 s and never take part (each costs the group one
  collective deadline when admitted; an identity lost twice is refused).

After ``--minutes`` of training, the peers stop together at an agreed step. Printed: steps completed, regroups,
bans (and whether each was Byzantine), joins, refusals, peak memory per peer (its process tree's RSS, sampled every
10 s, with the first and last thirds of the run to show it stays bounded), and the checks: no honest peer banned,
every honest peer that finished holds identical parameters, progress continued.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "scripts"), str(ROOT / "benchmarks")]


def _rss_of_group(pgid: int) -> int:
    """Bytes resident in every process of process group ``pgid`` (the peer, its DHT process, its p2pd)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:  # pgrp
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss in pages
        except (OSError, ValueError, IndexError):
            continue
    return total


class Peer:
    def __init__(self, name: str, cmd: list[str], run_dir: Path) -> None:
        self.name, self.run_dir = name, run_dir
        self.log = open(run_dir / f"{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.memory: list[tuple[float, int]] = []
        self.handled = False

    @property
    def step(self) -> int:
        try:
            return int((self.run_dir / self.name / "step").read_text().strip() or 0)
        except (OSError, ValueError):
            return -1

    def sample(self) -> None:
        if self.proc.poll() is None:
            self.memory.append((time.monotonic(), _rss_of_group(self.proc.pid)))

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def _sybils(first: str, run_id: str, count: int, stop: threading.Event, asked: list[int]) -> None:
    """``count`` identities that ask to join every 15 s and never take part."""
    from lightning_btard.groups.hivemind_admission import ask_to_join
    from lightning_btard.transports.hivemind_node import HivemindNode

    nodes = [HivemindNode(initial_peers=[first]) for _ in range(count)]
    try:
        while not stop.is_set():
            for node in nodes:
                try:
                    ask_to_join(node, run_id, os.urandom(32), wait=60.0)
                    asked[0] += 1
                except Exception:  # noqa: BLE001 - a flood does not care
                    pass
            stop.wait(15.0)
    finally:
        for node in nodes:
            node.shutdown()


def main(argv: Optional[list[str]] = None) -> int:
    from datamodules import write_synthetic_cifar10
    from lightning_btard.swarm import _free_port, make_identities

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=6)
    p.add_argument("--minutes", type=float, default=15.0, help="how long the peers train before they stop together")
    p.add_argument("--sybils", type=int, default=3)
    p.add_argument("--crash-at", type=int, default=20)
    p.add_argument("--withhold-at", type=int, default=40)
    p.add_argument("--collective-timeout", type=float, default=20.0)
    p.add_argument("--late-after", type=float, default=60.0, help="seconds of training before the late peer starts")
    p.add_argument("--validators", type=int, default=1)
    p.add_argument("--join-every", type=int, default=5)
    p.add_argument("--run-dir", default=None)
    args = p.parse_args(argv)
    if args.peers < 5:
        p.error("--peers must be >= 5 (a sign flipper, a withholder, a crashing peer and an honest majority)")
    run_id = f"soak-{uuid.uuid4().hex[:8]}"
    run_dir = Path(args.run_dir or ROOT / "runs" / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    data = run_dir / "data"
    write_synthetic_cifar10(data, n_train=4000, n_test=500, seed=0)
    flipper, withholder, crasher = args.peers - 2, args.peers - 1, 1
    keys = make_identities(run_dir, args.peers)
    (late_key, _), (rejoin_key, _) = make_identities(run_dir, 1, prefix="late")[0], make_identities(run_dir, 1, prefix="rejoin")[0]
    port = _free_port()
    first = f"/ip4/127.0.0.1/tcp/{port}/p2p/{keys[0][1]}"

    def command(name: str, key: Path, own_port: int) -> list[str]:
        return [
            sys.executable, "-m", "lightning_btard.cli", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
            f"--data.data_dir={data}", "--data.val_subset=200", f"--trainer.default_root_dir={run_dir / name}",
            "--trainer.max_steps=1000000", "--trainer.val_check_interval=100", "--trainer.enable_progress_bar=false",
            "--trainer.devices=1", "--trainer.strategy.backend=hivemind", f"--trainer.strategy.num_peers={args.peers}",
            f"--trainer.strategy.run_id={run_id}", f"--trainer.strategy.identity_path={key}",
            f"--trainer.strategy.host_maddrs=[/ip4/127.0.0.1/tcp/{own_port}]", "--trainer.strategy.rendezvous_timeout=900",
            f"--trainer.strategy.timeout={args.collective_timeout}", f"--trainer.strategy.join_every={args.join_every}",
            f"--trainer.strategy.validators={args.validators}",
            "--trainer.strategy.max_joins_per_window=50", "--trainer.strategy.shuffle_ranks=false",  # attacks by rank
            *([] if name == "peer0" else [f"--trainer.strategy.initial_peers=[{first}]"]),
            "--trainer.callbacks+=record_run.RecordRun", f"--trainer.callbacks.out_dir={run_dir / 'rec' / name}",
            "--trainer.callbacks+=soak_callbacks.SoakControl", f"--trainer.callbacks.run_dir={run_dir}",
            "--trainer.callbacks+=crash_at.CrashAt", f"--trainer.callbacks.rank={crasher}", f"--trainer.callbacks.step={args.crash_at}",
            "--trainer.callbacks+=lightning_btard.attacks.SignFlipping", f"--trainer.callbacks.byzantine=[{flipper}]",
            "--trainer.callbacks.attack_start=10",
            "--trainer.callbacks+=lightning_btard.attacks.Withholding", f"--trainer.callbacks.byzantine=[{withholder}]",
            f"--trainer.callbacks.attack_start={args.withhold_at}",
        ]

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "scripts"), str(ROOT / "benchmarks"),
                                                os.environ.get("PYTHONPATH", "")])
    peers: dict[str, Peer] = {}
    for rank, (key, _) in enumerate(keys):
        peers[f"peer{rank}"] = Peer(f"peer{rank}", command(f"peer{rank}", key, port if rank == 0 else 0), run_dir)
    print(f"soak {run_id}: {args.peers} peers; logs and figures in {run_dir}", flush=True)
    stop_flood, asked = threading.Event(), [0]
    flood: Optional[threading.Thread] = None
    started = time.monotonic()
    training_since: Optional[float] = None
    stop_step: Optional[int] = None
    notes: list[str] = []
    last_sample = 0.0
    try:
        while True:
            now = time.monotonic()
            if now - last_sample > 10:
                for peer in peers.values():
                    peer.sample()
                last_sample = now
            if training_since is None and all(peers[f"peer{r}"].step >= 0 for r in range(args.peers)):
                training_since = now
                print(f"  {now - started:.0f}s: all {args.peers} peers training", flush=True)
            if training_since is not None:
                if "late0" not in peers and now > training_since + args.late_after:
                    peers["late0"] = Peer("late0", command("late0", late_key, 0), run_dir)
                    notes.append("late peer started")
                    print(f"  {now - started:.0f}s: late peer started", flush=True)
                if flood is None and now > training_since + 30 and args.sybils:
                    flood = threading.Thread(target=_sybils, args=(first, run_id, args.sybils, stop_flood, asked), daemon=True)
                    flood.start()
                    print(f"  {now - started:.0f}s: {args.sybils} Sybil identities ask to join every 15 s", flush=True)
            for name, peer in list(peers.items()):
                code = peer.proc.poll()
                if code is None or peer.handled:
                    continue
                peer.handled = True
                print(f"  {now - started:.0f}s: {name} exited with code {code} at step {peer.step}", flush=True)
                if name == f"peer{crasher}" and code == -9:
                    peer.kill()  # its DHT process and p2pd, with the same identity, before it starts again
                    time.sleep(5)
                    peers["peer1.restart"] = Peer("peer1.restart", command("peer1.restart", keys[crasher][0], 0), run_dir)
                    notes.append(f"peer {crasher} killed at step {args.crash_at} and restarted with its key")
                elif name == f"peer{flipper}" and stop_step is None:
                    peers["rejoin"] = Peer("rejoin", command("rejoin", rejoin_key, 0), run_dir)
                    notes.append(f"banned peer {flipper} back under a new key")
            honest_steps = [p.step for n, p in peers.items() if p.proc.poll() is None]
            if stop_step is None and training_since is not None and now > training_since + 60 * args.minutes:
                stop_step = max(honest_steps + [0]) + 15
                (run_dir / "stop").write_text(str(stop_step))
                stop_flood.set()
                print(f"  {now - started:.0f}s: {args.minutes} minutes of training: the peers stop at step {stop_step}",
                      flush=True)
            if stop_step is not None and not honest_steps:
                break
            if stop_step is not None and now > training_since + 60 * args.minutes + 900:  # type: ignore[operator]
                print("  peers did not stop within 15 minutes of the stop step: killing them", flush=True)
                break
            time.sleep(1.0)
    finally:
        stop_flood.set()
        for peer in peers.values():
            peer.kill()
    return report(run_dir, peers, args, flipper, withholder, stop_step, asked[0], training_since, started, notes)


def report(run_dir: Path, peers: dict[str, Any], args: argparse.Namespace, flipper: int, withholder: int,
           stop_step: Optional[int], asked: int, training_since: Optional[float], started: float, notes: list[str]) -> int:
    import torch

    from lightning_btard.protocol.events import read_events

    def events(name: str, kind: Optional[str] = None) -> list[dict]:
        return [e for path in sorted((run_dir / name).glob("**/btard_events/*.jsonl")) for e in read_events(str(path), kind)]

    seen = events("peer0")
    bans = [(e["step"], e["peers"][0], e["evidence"]) for e in seen if e["kind"] == "ban"]
    joins = [(e["step"], e["peers"]) for e in seen if e["kind"] == "admission"]
    refusals = [(e["step"], e["evidence"]) for e in seen if e["kind"] == "refusal"]
    regroups = [e for e in seen if e["kind"] in ("regroup", "departure")]
    departures = [(e["step"], e["peers"]) for e in seen if e["kind"] == "departure"]
    joined_ids = {n: events(n, "joined")[0]["peers"][0] for n in ("peer1.restart", "late0", "rejoin")
                  if n in peers and events(n, "joined")}
    byzantine = {flipper, withholder}
    honest_names = [n for n in peers if n not in (f"peer{flipper}", f"peer{withholder}", "peer1")]
    finished = [n for n in honest_names if peers[n].proc.returncode == 0]
    records = {}
    for n in finished:
        path = next(iter((run_dir / "rec" / n).glob("params*.pt")), None)
        if path is not None:
            records[n] = (torch.load(path), json.loads(next(iter((run_dir / "rec" / n).glob("metrics*.json"))).read_text()))
    identical = len(records) >= 2 and all(
        all(torch.equal(v, other[0][k]) for k, v in next(iter(records.values()))[0].items()) for other in records.values())
    steps = sorted({r[1]["global_step"] for r in records.values()})
    honest_banned = [b for b in bans if b[1] not in byzantine]
    print(f"\nswarm soak ({run_dir.name}): {args.peers} peers, {args.minutes} min of training"
          f"{f' in {(time.monotonic() - training_since) / 60:.1f} min' if training_since else ''}")
    for note in notes:
        print(f"  - {note}")
    print(f"steps completed: {steps} (stop step {stop_step})")
    print(f"regroups (departures included), as peer 0 saw them: {len(regroups)}; departures: {departures}")
    print(f"bans: {[(s, p, ev, 'Byzantine' if p in byzantine else 'HONEST') for s, p, ev in bans]}")
    print(f"admissions: {joins}; peers that joined: {joined_ids}")
    print(f"refusals: {len(refusals)} {refusals[:6]}; Sybil join requests sent: {asked}")
    print("peak memory per peer (MiB; its process tree): first third / last third / peak")
    for name, peer in peers.items():
        mem = [m for _, m in peer.memory]
        if mem:
            third = max(1, len(mem) // 3)
            print(f"  {name:>14}: {max(mem[:third]) / 2**20:7.0f} / {max(mem[-third:]) / 2**20:7.0f} / {max(mem) / 2**20:7.0f}")
    checks = {
        "no honest peer banned": not honest_banned,
        "honest peers that finished hold identical parameters": identical,
        "all of them reached the stop step": bool(stop_step) and steps == [stop_step],
        "the sign flipper was banned": any(p == flipper for _, p, _ in bans),
    }
    for what, ok in checks.items():
        print(f"check: {what}: {'yes' if ok else 'NO'}")
    summary = {"steps": steps, "stop_step": stop_step, "regroups": len(regroups), "departures": departures,
               "flipper": flipper, "withholder": withholder, "joined": joined_ids, "bans": bans, "joins": joins,
               "refusals": len(refusals), "sybil_requests": asked, "checks": checks,
               "peak_mib": {n: max((m for _, m in p.memory), default=0) / 2**20 for n, p in peers.items()}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
