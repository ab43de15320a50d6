"""Detection: steps until every attacker is banned, per attack, with verification on (the default).

    ./run bench detection                         # 8 peers with 3 attackers, and 16 with 7 (the paper's setting)
    ./run bench detection --peers 8 --attackers 3 --attacks SignFlipping LabelFlipping

Each run trains a small MLP with ``BTARDStrategy()`` (one validator per step) on CPU processes; the
attackers are ranks 1..k, firing from step ``--start`` on. Reported per attack: how many attackers were
banned, the steps from the first attack to the last ban, and any honest peer banned (must be none).
Gradient attacks are caught by validators (a given attacker is validated with probability about
1/(n-1) per step); protocol attacks are caught in the round in which they fire.

``ALittleIsEnough`` builds its gradient from the colluders' spread: the last remaining colluder sends its
honest gradient, so it is banned only if a validator caught it before its colluders were gone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_btard.lightning_package import pl

GRADIENT_ATTACKS = ["SignFlipping", "RandomDirection", "LabelFlipping", "DelayedGradient", "InnerProductManipulation", "ALittleIsEnough"]
PROTOCOL_ATTACKS = ["WrongAggregate", "EquivocatingAggregate", "UncommittedPart", "MalformedPart", "LyingNumbers",
                    "WithheldReveal", "FalseAccusation"]
EXTRA_ARGS = {"DelayedGradient": {"delay": 3}}


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 4
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4096, 32, generator=g)
        y = (x[:, :4].argmax(1)).long()
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


class StopWhenBanned(pl.Callback):
    """Stop once every attacker is gone (or at max_steps); rank 0 writes the bans."""

    def __init__(self, out: str, attackers: list[int]) -> None:
        self.out, self.attackers = out, attackers

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        banned = {b.peer for b in trainer.strategy.bans}
        if set(self.attackers) <= banned:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            bans = [b.as_dict() for b in trainer.strategy.bans]
            Path(self.out).write_text(json.dumps({"bans": bans, "steps": trainer.global_step}))


def child(a: argparse.Namespace) -> None:
    import lightning_btard.attacks as attacks
    from lightning_btard import BTARDStrategy

    pl.seed_everything(a.seed)
    attackers = list(range(1, a.attackers + 1))
    attack = getattr(attacks, a.attack)(byzantine=attackers, attack_start=a.start, **EXTRA_ARGS.get(a.attack, {}))
    trainer = pl.Trainer(
        accelerator="cpu", devices=a.peers, strategy=BTARDStrategy(tau=1.0, check_params_every=10**9), max_steps=a.max_steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[attack, StopWhenBanned(a.out, attackers)],
    )
    trainer.fit(MLP())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, nargs="*", default=[8, 16])
    p.add_argument("--attackers", type=int, nargs="*", default=[3, 7])
    p.add_argument("--attacks", nargs="*", default=GRADIENT_ATTACKS + PROTOCOL_ATTACKS)
    p.add_argument("--start", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attack", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.attack is not None:
        a.peers, a.attackers = a.peers[0], a.attackers[0]
        return child(a)
    if len(a.peers) != len(a.attackers):
        p.error("give as many --attackers as --peers")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for peers, k in zip(a.peers, a.attackers):
            for attack in a.attacks:
                out = os.path.join(tmp, f"{attack}-{peers}.json")
                cmd = [sys.executable, __file__, "--peers", str(peers), "--attackers", str(k), "--attack", attack,
                       "--start", str(a.start), "--max-steps", str(a.max_steps), "--seed", str(a.seed), "--out", out]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
                began = time.perf_counter()
                proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=3600)
                if proc.returncode != 0 or not Path(out).exists():
                    rows.append((peers, k, attack, "run failed", "", "", proc.stderr[-300:].replace("\n", " ")))
                    continue
                result = json.loads(Path(out).read_text())
                attackers = set(range(1, k + 1))
                banned = [b for b in result["bans"] if b["peer"] in attackers]
                honest = [b["peer"] for b in result["bans"] if b["peer"] not in attackers]
                last = max((b["step"] for b in banned), default=None)
                steps = f"{last - a.start}" if last is not None and len(banned) == k else f"> {result['steps'] - a.start}"
                kinds = sorted({b["evidence"] for b in banned})
                rows.append((peers, k, attack, f"{len(banned)}/{k}", steps, ", ".join(map(str, honest)) or "none", ", ".join(kinds)))
                print(f"  {peers} peers, {attack}: {len(banned)}/{k} banned, steps {steps} ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    print(f"Detection with BTARDStrategy() (1 validator per step), attackers from step {a.start}; small MLP, CPU processes\n")
    print("| peers | attackers | attack | banned | steps to the last ban | honest peers banned | evidence |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
