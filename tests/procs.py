"""Running multi-process tests: free ports, timeouts, no process left behind, and reading what the ranks saved."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        PYTHONWARNINGS="ignore",
    )
    env.update(extra or {})
    return env


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_script(
    script: str,
    args: Sequence[str] = (),
    *,
    timeout: float,
    env: Optional[dict[str, str]] = None,
    cwd: Optional[Path] = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``tests/scripts/<script>`` (which may launch its own ranks); see :func:`run_command`."""
    return run_command([sys.executable, str(SCRIPTS / script), *args], timeout=timeout, env=env, cwd=cwd, check=check)


def run_command(
    cmd: Sequence[str], *, timeout: float, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a fresh session; kill the whole session (every rank it launched) when it ends or times out.
    Raises with the output when the run fails and ``check``."""
    script = Path(cmd[1]).name if len(cmd) > 1 else cmd[0]
    proc = subprocess.Popen(
        list(cmd),
        env=env or base_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"{script} timed out after {timeout}s:\n{out[-6000:]}") from None
    finally:
        _kill(proc)  # whatever it launched goes too
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{out[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def run_ranks(script: str, world_size: int, args: Sequence[str] = (), *, timeout: float) -> list[str]:
    """Run ``world_size`` copies of a plain torch.distributed script (RANK/WORLD_SIZE set); all or nothing."""
    env = base_env({"WORLD_SIZE": str(world_size)})
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / script), *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in range(world_size)
    ]
    outs: list[str] = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            _kill(p)
        raise AssertionError(f"{script} timed out after {timeout}s") from None
    finally:
        for p in procs:
            _kill(p)
    for r, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise AssertionError(f"{script} rank {r} exited with {p.returncode}:\n{out[-6000:]}")
    return outs


def load_run(out_dir: Path, ranks: Union[int, Sequence[int]]) -> tuple[list[dict], list[dict]]:
    """The final parameters and metrics ``tests/scripts/train_tiny.py`` saved for ``ranks`` (or ranks ``0..n-1``)."""
    import torch

    ranks = range(ranks) if isinstance(ranks, int) else ranks
    params = [torch.load(out_dir / f"params{r}.pt") for r in ranks]
    metrics = [json.loads((out_dir / f"metrics{r}.json").read_text()) for r in ranks]
    return params, metrics


def assert_identical(params: list[dict]) -> None:
    """Every peer's parameters equal, bit for bit."""
    import torch

    for other in params[1:]:
        for name, value in params[0].items():
            assert torch.equal(value, other[name]), name
