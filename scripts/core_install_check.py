"""Run by scripts/install_check.sh in a virtualenv holding only ``pip install .`` (the core).

The core must import and train with BTARD on torch.distributed; each optional feature must fail with one message
naming the extra that installs it (``lightning_btard/extras.py``).
"""

from __future__ import annotations

import importlib.util
import sys

import torch

for optional in ("hivemind", "transformers", "datasets", "torch_optimizer", "torchvision", "matplotlib", "wandb"):
    assert importlib.util.find_spec(optional) is None, f"the core install pulled in {optional}"

from lightning_btard import BTARDStrategy  # noqa: E402
from lightning_btard.extras import MissingExtra  # noqa: E402
from lightning_btard.lightning_package import pl  # noqa: E402


def expect_missing(extra: str, make) -> None:
    try:
        make()
    except MissingExtra as e:
        assert f'lightning-btard[{extra}]' in str(e), str(e)
        print(f"  ok: {e}")
        return
    raise AssertionError(f"expected a message naming [{extra}]")


def albert() -> None:
    from models import AlbertPretraining

    AlbertPretraining(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)


def wikitext() -> None:
    from datamodules import WikiText103DataModule

    WikiText103DataModule("data", synthetic=True)


def cifar() -> None:
    from datamodules import CIFAR10DataModule

    CIFAR10DataModule("data")


expect_missing("albert", albert)
expect_missing("albert", wikitext)
expect_missing("examples", cifar)
expect_missing("hivemind", lambda: BTARDStrategy(backend="hivemind", num_peers=2))


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
        return torch.utils.data.DataLoader(data, batch_size=8)


trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=BTARDStrategy(start_method="fork"), max_steps=3, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
model = Tiny()
before = model.layer.weight.detach().clone()
trainer.fit(model)  # the fork launcher hands rank 0's trained weights back to this process
assert not torch.equal(before, model.layer.weight), "the core did not train"
print(f"  ok: the core trained 3 steps with BTARD on 2 peers ({pl.__name__} {pl.__version__}, python {sys.version.split()[0]})")
