"""Lightning's own BoringModel under BTARD, as a new user would try it: with ``--seed-per-rank`` every rank seeds with
its rank (``seed_everything(rank)``), so each rank's RandomDataset differs."""

import argparse
import json
import os

import torch

from lightning_btard import BTARDStrategy
from lightning_btard.lightning_package import pl, pl_module

BoringModel = pl_module("demos.boring_classes").BoringModel

p = argparse.ArgumentParser()
p.add_argument("out_dir")
p.add_argument("--devices", type=int, default=2)
p.add_argument("--seed-per-rank", action="store_true")
args = p.parse_args()


class Model(BoringModel):
    def setup(self, stage: str) -> None:
        pl.seed_everything(self.trainer.global_rank if args.seed_per_rank else 0)

    def on_fit_end(self) -> None:
        rank = self.trainer.global_rank
        torch.save({k: v.detach().clone() for k, v in self.named_parameters()}, os.path.join(args.out_dir, f"params{rank}.pt"))
        with open(os.path.join(args.out_dir, f"metrics{rank}.json"), "w") as f:
            json.dump({"bans": [b.as_dict() for b in self.trainer.strategy.bans], "global_step": self.trainer.global_step}, f)


if __name__ == "__main__":
    trainer = pl.Trainer(
        default_root_dir=args.out_dir, accelerator="cpu", devices=args.devices, max_steps=6, logger=False,
        strategy=BTARDStrategy(start_method="fork"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Model())
