"""Start N hivemind peers on this machine (loopback), some of them attackers, and collect their logs.

    python -m lightning_btard.swarm --peers 4 --byzantine 3 --attack-config configs/attacks/sign_flipping.yaml \\
        --attack-arg attack_start=20 -- --config configs/demo.yaml --trainer.max_steps=100

Everything after ``--`` goes to every peer's ``btard fit``. Each peer is its own process with
``BTARDStrategy(backend="hivemind")`` and one device; they find each other through the first peer's
address, as peers on separate machines would. The peers' identity keys are made here first, so the rank
each will get (the order of peer ids) is known, and ``--byzantine`` names ranks as on the torch backend.
Every peer gets the same callbacks (an attack acts only on the ranks it names). Logs: ``RUN_DIR/peer<rank>.log``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

__all__ = ["main", "make_identities"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_identities(run_dir: Path, n: int, prefix: str = "peer") -> list[tuple[Path, str]]:
    """``n`` fresh identity files in ``run_dir`` (``<prefix><i>.key``), in rank order, with their peer ids (base58)."""
    from hivemind.p2p import PeerID
    from hivemind.utils.crypto import RSAPrivateKey

    from lightning_btard.groups.hivemind_rendezvous import rank_order
    from lightning_btard.transports.hivemind_node import identity_bytes, write_identity

    blobs = {PeerID.from_identity(blob): blob for blob in (identity_bytes(RSAPrivateKey()) for _ in range(n))}
    out = []
    for rank, peer in enumerate(rank_order(list(blobs))):
        path = run_dir / f"{prefix}{rank}.key"
        write_identity(str(path), blobs[peer])
        out.append((path, peer.to_base58()))
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _training(run_dir: Path, rank: int) -> bool:
    """Whether peer ``rank`` got through set-up into training (its log says so): before that, the others would wait
    for it in set-up collectives until their timeout."""
    return f"BTARD hivemind: rank {rank} set up; training" in _read(run_dir / f"peer{rank}.log")


def _events(root: Path, kind: Optional[str] = None) -> list[dict]:
    """The events a peer whose run directory is ``root`` wrote (``btard_events/rank<r>.jsonl`` under its log dir)."""
    from lightning_btard.protocol.events import read_events

    return [e for path in sorted(root.glob("**/btard_events/*.jsonl")) for e in read_events(str(path), kind)]


def _banned(root: Path) -> Optional[int]:
    """The step at which the peer with run directory ``root`` was banned (its own ``left`` event), if it was."""
    left = _events(root, "left")
    return left[0]["step"] if left else None


def _peer_command(args: argparse.Namespace, name: str, key: Path, port: int, first: Optional[str], run_id: str) -> list[str]:
    cmd = [sys.executable, "-m", "lightning_btard.cli", "fit", f"--trainer.default_root_dir={key.parent / name}", *args.fit_args]
    if args.attack_config:
        cmd += ["--config", args.attack_config, f"--trainer.callbacks.byzantine=[{','.join(map(str, args.byzantine))}]"]
        cmd += [f"--trainer.callbacks.{kv}" for kv in args.attack_arg]
    cmd += [
        "--trainer.devices=1",
        "--trainer.strategy.backend=hivemind",
        f"--trainer.strategy.num_peers={args.peers}",
        f"--trainer.strategy.run_id={run_id}",
        f"--trainer.strategy.identity_path={key}",
        f"--trainer.strategy.host_maddrs=[/ip4/127.0.0.1/tcp/{port}]",
        f"--trainer.strategy.rendezvous_timeout={args.timeout}",
        "--trainer.strategy.shuffle_ranks=false",  # ranks by peer id: the keys were made in rank order (--byzantine)
    ]
    if first is not None:
        cmd.append(f"--trainer.strategy.initial_peers=[{first}]")
    return cmd


def _summary(run_dir: Path, n: int, codes: list[Optional[int]], byzantine: list[int], late: list[Optional[int]],
             rejoined: dict[int, Optional[int]]) -> str:
    """Who finished, was banned, joined or was refused, from the peers' event files (``protocol/events.py``)."""
    from lightning_btard.protocol.events import Event

    lines = [f"{n} hivemind peers, logs in {run_dir}/peer<rank>.log" + (" (late peers: late<i>.log)" if late else "")]
    for rank in range(n):
        banned = _banned(run_dir / f"peer{rank}")
        state = f"banned at step {banned}" if banned is not None else ("finished" if codes[rank] == 0 else f"exit code {codes[rank]}")
        if rank in rejoined:
            refused = _events(run_dir / f"peer{rank}.rejoin", "refusal")
            state += "; asked to join again: " + (f"refused ({refused[0]['reason']})" if refused else f"exit code {rejoined[rank]}")
        lines.append(f"  rank {rank}{' (attacker)' if rank in byzantine else ''}: {state}")
    for i, code in enumerate(late):
        joined = _events(run_dir / f"late{i}", "joined")
        state = f"joined at step {joined[0]['step']} as peer {joined[0]['peers'][0]}" if joined else "did not join"
        state += ", " + ("finished" if code == 0 else f"exit code {code}")
        lines.append(f"  late peer {i}: {state}")
    honest = [r for r in range(n) if r not in byzantine and codes[r] == 0]
    if honest:
        seen = _events(run_dir / f"peer{honest[0]}")
        bans = [e for e in seen if e["kind"] == "ban"]
        lines.append(f"ban list seen by rank {honest[0]}:")
        lines.append(f"BTARD: {len(bans)} peer(s) banned during the run" + (":" if bans else "."))
        lines += [f"  step {e['step']:>6}  peer {e['peers'][0]:>3}  {e['reason']} [{e['evidence']}]" for e in bans]
        for e in seen:
            if e["kind"] in ("departure", "admission", "refusal", "regroup"):
                event = Event(e["kind"], e["step"], tuple(e["peers"]), e["reason"], e["evidence"], tuple(e["members"]))
                lines.append(f"seen by rank {honest[0]}: {event.message()}")
    return "\n".join(lines)


def _start(cmd: list[str], log_path: Path, logs: list) -> subprocess.Popen:
    log = open(log_path, "w")
    logs.append(log)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fit_args: list[str] = []
    if "--" in argv:
        fit_args, argv = argv[argv.index("--") + 1 :], argv[: argv.index("--")]
    p = argparse.ArgumentParser(prog="python -m lightning_btard.swarm", description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, required=True, help="how many peers (processes) start the run")
    p.add_argument("--byzantine", type=int, nargs="*", default=[], help="ranks the attack acts on")
    p.add_argument("--attack-config", default=None, help="an attack YAML (configs/attacks/...) given to every peer")
    p.add_argument("--attack-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument of the attack, e.g. attack_start=100 (repeatable)")
    p.add_argument("--late-peers", type=int, default=0, help="peers that start after the run did and join it")
    p.add_argument("--late-delay", type=float, default=10.0,
                   help="seconds after every peer is training before the late peers start")
    p.add_argument("--rejoin-banned", action="store_true",
                   help="start a banned peer again with its own key once it has left (the others refuse it)")
    p.add_argument("--run-dir", default=None, help="where keys and logs go (default runs/swarm-<id>)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before every peer is stopped")
    args = p.parse_args(argv)
    args.fit_args = fit_args
    if args.peers < 1 or args.late_peers < 0:
        p.error("--peers must be >= 1 and --late-peers >= 0")
    if args.byzantine and not args.attack_config:
        p.error("--byzantine needs --attack-config")
    run_id = f"swarm-{uuid.uuid4().hex[:8]}"
    run_dir = Path(args.run_dir or Path("runs") / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    keys = make_identities(run_dir, args.peers)
    late_keys = make_identities(run_dir, args.late_peers, prefix="late")
    port = _free_port()
    first = f"/ip4/127.0.0.1/tcp/{port}/p2p/{keys[0][1]}"
    procs: list[subprocess.Popen] = []
    late: list[subprocess.Popen] = []
    rejoined: dict[int, subprocess.Popen] = {}
    logs: list = []
    try:
        for rank, (key, _) in enumerate(keys):
            cmd = _peer_command(args, f"peer{rank}", key, port if rank == 0 else 0, first if rank else None, run_id)
            procs.append(_start(cmd, run_dir / f"peer{rank}.log", logs))
        print(f"started {args.peers} peers (run {run_id}); first peer at {first}; logs in {run_dir}", flush=True)
        deadline = time.monotonic() + args.timeout
        reported: set[int] = set()
        training_since: Optional[float] = None
        while any(proc.poll() is None for proc in procs + late) and time.monotonic() < deadline:
            failed = [r for r, proc in enumerate(procs) if proc.poll() not in (None, 0) and r not in reported]
            if failed and not all(_training(run_dir, r) for r in failed):
                print(f"peer(s) {failed} failed before training: stopping the others (see their logs)", flush=True)
                break
            for r in failed:  # in training, the others regroup without it after their collective deadline
                print(f"peer {r} exited with code {procs[r].returncode}; the others continue without it", flush=True)
                reported.add(r)
            if training_since is None and all(_training(run_dir, r) for r in range(args.peers)):
                training_since = time.monotonic()
            if training_since is not None and not late and time.monotonic() > training_since + args.late_delay:
                for i, (key, _) in enumerate(late_keys):
                    late.append(_start(_peer_command(args, f"late{i}", key, 0, first, run_id), run_dir / f"late{i}.log", logs))
                    print(f"started late peer {i}; it joins the running group", flush=True)
            for r, proc in enumerate(procs):
                # rank 0 is not started again: its address was everyone's way in
                if args.rejoin_banned and r and r not in rejoined and proc.poll() == 0 and _banned(run_dir / f"peer{r}") is not None:
                    cmd = _peer_command(args, f"peer{r}.rejoin", keys[r][0], 0, first, run_id)
                    rejoined[r] = _start(cmd, run_dir / f"peer{r}.rejoin.log", logs)
                    print(f"banned peer {r} starts again with its own key and asks to join", flush=True)
            time.sleep(0.5)
        for proc in rejoined.values():  # refused by now, or still asking when the run ended
            try:
                proc.wait(timeout=max(0.0, min(30.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        print("interrupted: stopping the peers", flush=True)
    finally:
        for proc in procs + late + list(rejoined.values()):
            try:  # the whole group: a peer that died leaves its DHT process and p2pd behind otherwise
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for log in logs:
            log.close()
    codes = [proc.returncode for proc in procs]
    late_codes = [proc.returncode for proc in late] + [None] * (args.late_peers - len(late))
    print(_summary(run_dir, args.peers, codes, args.byzantine, late_codes, {r: q.returncode for r, q in rejoined.items()}), flush=True)
    honest_ok = all(codes[r] == 0 for r in range(args.peers) if r not in args.byzantine) and all(c == 0 for c in late_codes)
    return 0 if honest_ok else 1


if __name__ == "__main__":
    sys.exit(main())
