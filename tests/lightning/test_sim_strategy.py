"""BTARDSimStrategy: N peers simulated in one process give what N processes give (parameters, buffers, bans)."""

from __future__ import annotations

import json

import pytest
import torch
from procs import load_run, run_script

from lightning_btard import BTARDSimStrategy
from lightning_btard.errors import UserError
from lightning_btard.lightning_package import StrategyRegistry, pl

CASES = {
    # validators draw from the MPRNG: --deterministic-secrets makes both runs draw the same ones
    "verified-validation-bans-sign-flipper": [
        "--verify", "--deterministic-secrets", "--attack", "SignFlipping", "--byzantine", "2", "--attack-start", "3",
        "--steps", "8",
    ],
    "verified-projection-check-bans-wrong-aggregate": [
        "--verify", "--validators", "0", "--attack", "WrongAggregate", "--byzantine", "1", "--attack-start", "2", "--steps", "6",
    ],
    # colluding through the channel of all peers, on a label-skewed split, with a rule other than CenteredClip
    "unverified-omniscient-alie-trimmed-mean-dirichlet": [
        "--aggregator", "trimmed_mean", "--aggregator-options", '{"trim": 1}', "--data-split", '{"kind": "dirichlet", "alpha": 0.5}',
        "--attack", "ALittleIsEnough", "--attack-args", '{"omniscient": true}', "--byzantine", "1", "3", "--attack-start", "2",
        "--steps", "6",
    ],
    "unverified-label-flipping-centered-clip": [
        "--data-split", '"iid"', "--attack", "LabelFlipping", "--byzantine", "0", "--attack-start", "1", "--steps", "6", "--tau", "0.5",
    ],
}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", list(CASES))
def test_simulated_peers_match_processes(tmp_path, case) -> None:
    """The same run as 4 processes and as 4 simulated peers: the same parameters and BatchNorm buffers (to float
    tolerance: the threads' collectives sum in the same order, so in practice bit for bit), the same bans. The simulation
    reports the first honest peer (its buffers are the module's): rank 0, or rank 1 where rank 0 attacks."""
    args = CASES[case]
    byzantine = args[args.index("--byzantine") + 1]
    reporter = 1 if byzantine == "0" else 0
    for strategy in ("btard", "btard_sim"):
        (tmp_path / strategy).mkdir()
        run_script("train_tiny.py", [str(tmp_path / strategy), "--strategy", strategy, "--devices", "4", *args], timeout=300)
    (procs,), (procs_metrics,) = load_run(tmp_path / "btard", [reporter])
    (sim,), (sim_metrics,) = load_run(tmp_path / "btard_sim", [0])
    for name, value in procs.items():
        assert torch.allclose(sim[name], value, atol=1e-6, rtol=1e-5), name
    procs_buffers = torch.load(tmp_path / "btard" / f"buffers{reporter}.pt")
    sim_buffers = torch.load(tmp_path / "btard_sim" / "buffers0.pt")
    for name, value in procs_buffers.items():
        assert torch.allclose(sim_buffers[name].double(), value.double(), atol=1e-6, rtol=1e-5), name
    assert sim_metrics["bans"] == procs_metrics["bans"]
    if case.startswith("verified"):
        assert [b["peer"] for b in sim_metrics["bans"]] == [int(byzantine)]
    assert sim_metrics["global_step"] == procs_metrics["global_step"]
    assert sim_metrics["metrics"]["btard/peers"] == procs_metrics["metrics"]["btard/peers"]
    # training moved the parameters (the comparison is not trivially true)
    start = torch.load(tmp_path / "btard_sim" / "init0.pt")
    assert sum(float((start[k] - sim[k]).abs().sum()) for k in sim) > 0.1


@pytest.mark.timeout(300)
def test_simulated_run_resumes_from_its_checkpoint(tmp_path) -> None:
    """Stopped at step 6 and resumed to 10: the parameters of an uninterrupted 10-step run, and the ban list kept."""
    common = ["--strategy", "btard_sim", "--devices", "4", "--verify", "--validators", "0", "--attack", "WrongAggregate",
              "--byzantine", "3", "--attack-start", "2"]
    for d in ("whole", "first", "second"):
        (tmp_path / d).mkdir()
    ckpt = tmp_path / "at6.ckpt"
    run_script("train_tiny.py", [str(tmp_path / "whole"), "--steps", "10", *common], timeout=200)
    run_script("train_tiny.py", [str(tmp_path / "first"), "--steps", "6", "--save-ckpt", str(ckpt), *common], timeout=200)
    out = run_script("train_tiny.py", [str(tmp_path / "second"), "--steps", "10", "--resume", str(ckpt), *common], timeout=200)
    assert "resumed with the checkpoint's ban list: [3]" in out.stdout
    (whole,), (whole_metrics,) = load_run(tmp_path / "whole", [0])
    (resumed,), (resumed_metrics,) = load_run(tmp_path / "second", [0])
    for name, value in whole.items():
        assert torch.allclose(resumed[name], value, atol=1e-6, rtol=1e-5), name
    assert resumed_metrics["bans"] == whole_metrics["bans"] and [b["peer"] for b in whole_metrics["bans"]] == [3]
    saved = torch.load(ckpt, weights_only=False)
    assert saved["btard_sim"]["num_peers"] == 4 and len(saved["btard_sim"]["buffers"]) == 4
    assert json.dumps(saved["btard"]["bans"])  # plain data, as BTARDStrategy's


class _Tiny(pl.LightningModule):
    def __init__(self, manual: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.automatic_optimization = not manual
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
        return torch.utils.data.DataLoader(data, batch_size=4)


def _fit(strategy, devices: int = 1, accumulate: int = 1, manual: bool = False, precision: str = "32-true", lr: float = 0.1,
         steps: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accumulate_grad_batches=accumulate, precision=precision)
    trainer.fit(_Tiny(manual, lr))
    return trainer


def test_registered_by_name_and_trains_in_process() -> None:
    assert "btard_sim" in StrategyRegistry
    trainer = _fit("btard_sim")
    assert isinstance(trainer.strategy, BTARDSimStrategy) and trainer.strategy.num_peers == 4
    assert trainer.global_step == 2 and trainer.strategy.bans == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"devices": 2}, "use devices=1"),
        ({"accumulate": 2}, "accumulate_grad_batches must be 1"),
        ({"manual": True}, "needs automatic optimization"),
    ],
)
def test_clear_errors_for_what_the_simulation_cannot_do(kwargs, message) -> None:
    with pytest.raises(UserError, match=message):
        _fit(BTARDSimStrategy(num_peers=3), **kwargs)


def test_bf16_mixed_precision_trains() -> None:
    trainer = _fit(BTARDSimStrategy(num_peers=3), precision="bf16-mixed")
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_an_unverified_run_that_diverges_goes_on_as_n_processes_do() -> None:
    """No defence and a huge learning rate: the parameters become NaN, and every honest peer's aggregate is the same
    NaN-filled vector (the honest peers' agreement is checked bit for bit, NaNs included)."""
    trainer = _fit(BTARDSimStrategy(num_peers=3, aggregator="mean", check_params_every=1), lr=float("inf"), steps=4)
    assert trainer.global_step == 4
    assert not all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_bad_arguments() -> None:
    with pytest.raises(UserError, match="num_peers"):
        BTARDSimStrategy(num_peers=0)
    with pytest.raises(UserError, match="verify=True checks CenteredClip"):
        BTARDSimStrategy(aggregator="krum", verify=True)


class _Wide(pl.LightningModule):
    """About 17k parameters: parts of thousands of elements, CenteredClip's Gram matrix over 1024-element pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 32))

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(3)
        data = torch.utils.data.TensorDataset(torch.randn(256, 32, generator=g), torch.randint(0, 32, (256,), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=4)


def test_unverified_training_with_uncertified_centered_clip_is_the_certified_training(monkeypatch) -> None:
    """An unverified run skips CenteredClip's certifying pass (certify=False). On the same run with clipping active,
    it trains to the very parameters the certified solver gives (the pass, where run, finds nothing to move)."""
    from lightning_btard.aggregators import centered_clip as aggregator_module

    solved = []
    solve = aggregator_module.centered_clip_with_stats

    def recorded(*args, **kwargs):
        result = solve(*args, **kwargs)
        solved.append((kwargs["certify"], result.certified))
        return result

    monkeypatch.setattr(aggregator_module, "centered_clip_with_stats", recorded)
    params, clipped = {}, {}
    for certify in (False, True):
        pl.seed_everything(0)
        strategy = BTARDSimStrategy(num_peers=4, verify=False, tau=0.02, aggregator_options={"certify": certify},
                                    check_params_every=1)
        assert strategy.aggregator.certify is certify
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=6, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        module = _Wide()
        trainer.fit(module)
        params[certify] = torch.cat([p.detach().flatten() for p in module.parameters()])
        clipped[certify] = float(trainer.callback_metrics["btard/clipped"])
    assert clipped[False] == clipped[True] > 0  # the rows were clipped: CenteredClip, not the mean
    assert torch.equal(params[False], params[True])
    assert (False, False) in solved and (True, False) not in solved  # the uncertified run took the shortcut
