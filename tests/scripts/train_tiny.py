"""A tiny Lightning training under a chosen strategy; every rank saves its final parameters and metrics.

Usage: train_tiny.py OUT_DIR [--strategy btard|ddp] [--devices N] [--aggregator NAME] [--tau T] ...
Launched once: Lightning's popen launcher re-runs this script for the other ranks.
"""

import argparse
import json
import os

from lightning_btard.lightning_package import pl
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_btard import BTARDSimStrategy, BTARDStrategy

p = argparse.ArgumentParser()
p.add_argument("out_dir")
p.add_argument("--strategy", default="btard")
p.add_argument("--start-method", default="fork", help="how ranks start: fork (fast: no re-import per rank), popen (as users run it) or spawn")
p.add_argument("--devices", type=int, default=4)
p.add_argument("--aggregator", default="centered_clip")
p.add_argument("--tau", type=float, default=1.0)
p.add_argument("--steps", type=int, default=12)
p.add_argument("--accumulate", type=int, default=1)
p.add_argument("--clip", type=float, default=None)
p.add_argument("--momentum", type=float, default=0.9)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--manual", action="store_true")
p.add_argument("--precision", default="32-true")
p.add_argument("--check-every", type=int, default=5)
p.add_argument("--save-ckpt", default=None, help="save a checkpoint here at the end")
p.add_argument("--verify", action="store_true")
p.add_argument("--attack", default=None, help="an attack class from lightning_btard.attacks")
p.add_argument("--byzantine", type=int, nargs="*", default=[])
p.add_argument("--attack-start", type=int, default=0)
p.add_argument("--attack-args", default="{}", help="JSON of the attack's own arguments")
p.add_argument("--validators", type=int, default=1)
p.add_argument("--data-split", default="null", help="JSON of BTARDStrategy's data_split")
p.add_argument("--topology", default="butterfly")
p.add_argument("--aggregator-options", default="{}", help="JSON of BTARDStrategy's aggregator_options")
p.add_argument("--dropout", type=float, default=0.0)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--iterable", action="store_true", help="serve the training data from an IterableDataset")
p.add_argument("--resume", default=None, help="resume from this checkpoint")
p.add_argument("--keep-grads", action="store_true", help="zero_grad(set_to_none=False): gradients stay allocated across steps")
p.add_argument("--deterministic-secrets", action="store_true",
               help="TESTS ONLY: each peer's MPRNG secrets derive from (peer, step), so that two runs draw the same validators")
args = p.parse_args()

if args.deterministic_secrets:
    import hashlib

    from lightning_btard.protocol import mprng

    mprng.MPRNGSecret.fresh = classmethod(lambda cls, peer, step: cls(peer, step, hashlib.sha256(f"test/{peer}/{step}".encode()).digest()))


class Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


class Tiny(pl.LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.num_classes = 2  # for LabelFlipping's default rule
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Dropout(args.dropout),
            torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2),
        )
        self.unused = torch.nn.Linear(3, 3)  # never gets a gradient: the layout must still match

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, sync_dist=True)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=args.lr, momentum=args.momentum)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=not args.keep_grads)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 8, generator=g)
        y = ((x[:, 0] + 0.5 * x[:, 1]) > 0).long()
        if args.iterable:
            return DataLoader(Stream(x, y), batch_size=8)
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)


class Record(pl.Callback):
    def __init__(self) -> None:
        self.steps_seen = []

    def on_train_start(self, trainer, pl_module):
        params = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        torch.save(params, os.path.join(args.out_dir, f"init{trainer.global_rank}.pt"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps_seen.append(trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        """Every rank saves here, inside fit (a forked rank never returns to the script after ``trainer.fit``)."""
        if args.save_ckpt:
            trainer.save_checkpoint(args.save_ckpt)
        rank = trainer.global_rank
        torch.save({k: v.detach().clone() for k, v in pl_module.named_parameters()}, os.path.join(args.out_dir, f"params{rank}.pt"))
        torch.save({k: v.detach().clone() for k, v in pl_module.named_buffers()}, os.path.join(args.out_dir, f"buffers{rank}.pt"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        bans = [b.as_dict() for b in getattr(trainer.strategy, "bans", [])]
        with open(os.path.join(args.out_dir, f"metrics{rank}.json"), "w") as f:
            json.dump({"metrics": metrics, "global_step": trainer.global_step, "batches": len(self.steps_seen), "bans": bans}, f)


if __name__ == "__main__":
    pl.seed_everything(args.seed)
    if args.strategy == "btard":
        strategy = BTARDStrategy(
            tau=args.tau, aggregator=args.aggregator, check_params_every=args.check_every, verify=args.verify,
            validators=args.validators, start_method=args.start_method, data_split=json.loads(args.data_split),
            topology=args.topology, aggregator_options=json.loads(args.aggregator_options),
        )
    elif args.strategy == "btard_sim":
        strategy = BTARDSimStrategy(
            num_peers=args.devices, tau=args.tau, aggregator=args.aggregator, check_params_every=args.check_every,
            verify=args.verify, validators=args.validators, data_split=json.loads(args.data_split), topology=args.topology,
            aggregator_options=json.loads(args.aggregator_options),
        )
    else:
        strategy = args.strategy.replace("ddp", "ddp_fork", 1) if args.start_method == "fork" else args.strategy
    rec = Record()
    callbacks = [rec]
    if args.attack:
        import lightning_btard.attacks

        attack_args = json.loads(args.attack_args)
        callbacks.append(getattr(lightning_btard.attacks, args.attack)(byzantine=args.byzantine, attack_start=args.attack_start, **attack_args))
    trainer = pl.Trainer(
        default_root_dir=args.out_dir,  # run outputs (the peers' event files) in the test's directory
        accelerator="cpu",
        devices=1 if args.strategy == "btard_sim" else args.devices,
        strategy=strategy,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate if not args.manual else 1,
        gradient_clip_val=args.clip,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    model = Tiny(manual=args.manual)
    trainer.fit(model, ckpt_path=args.resume)
