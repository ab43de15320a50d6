"""A user of the unified ``lightning`` package, as its docs teach (``import lightning.pytorch as L``): Lightning's
BoringModel under BTARDStrategy (an instance, or ``strategy="btard"``), with an attack callback, on 2 peers."""

import argparse
import json
import os

import lightning.pytorch as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_btard import BTARDStrategy
from lightning_btard.attacks import SignFlipping

p = argparse.ArgumentParser()
p.add_argument("out_dir")
p.add_argument("--by-name", action="store_true", help='strategy="btard" instead of an instance')
args = p.parse_args()


class Model(BoringModel):
    def on_fit_end(self) -> None:
        rank = self.trainer.global_rank
        torch.save({k: v.detach().clone() for k, v in self.named_parameters()}, os.path.join(args.out_dir, f"params{rank}.pt"))
        strategy = self.trainer.strategy
        with open(os.path.join(args.out_dir, f"metrics{rank}.json"), "w") as f:
            json.dump({
                "global_step": self.trainer.global_step,
                "bans": [b.as_dict() for b in strategy.bans],
                "strategy_bases": [f"{c.__module__}.{c.__qualname__}" for c in type(strategy).__mro__],
                "lightning_btard_uses": os.environ["BTARD_LIGHTNING"],
                "metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items()},
            }, f)


if __name__ == "__main__":
    L.seed_everything(0)  # the same RandomDataset on every peer (strategy="btard" re-runs this script per rank)
    trainer = L.Trainer(
        default_root_dir=args.out_dir, accelerator="cpu", devices=2, max_steps=5, logger=False,
        strategy="btard" if args.by_name else BTARDStrategy(start_method="fork"),
        callbacks=[SignFlipping(byzantine=[1], attack_start=10**9)],  # accepted as a lightning.pytorch Callback
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Model())
