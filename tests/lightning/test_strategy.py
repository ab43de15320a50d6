"""BTARDStrategy under Lightning: identical parameters, equivalence with DDP, accumulation, clipping, precision."""

from __future__ import annotations

import pytest
import torch
from procs import assert_identical, base_env, load_run, run_script

from lightning_btard import BTARDStrategy
from lightning_btard.aggregators import AggregationResult
from lightning_btard.lightning_package import StrategyRegistry, pl


@pytest.mark.timeout(300)
def test_four_peers_stay_identical_with_accumulation_and_clipping(tmp_path) -> None:
    # launched as users launch it (Lightning's popen launcher re-runs the script per rank); the other tests fork
    run_script("train_tiny.py", [str(tmp_path), "--devices", "4", "--steps", "10", "--accumulate", "2", "--clip", "0.5",
                                 "--start-method", "popen"], timeout=240)
    params, metrics = load_run(tmp_path, 4)
    assert_identical(params)
    for m in metrics:
        assert m["global_step"] == 10 and m["batches"] == 20
        assert m["metrics"]["btard/params_in_sync"] == 1.0
        assert m["metrics"]["btard/cc_residual"] <= 1e-6
        for key in ("btard/clipped", "btard/cc_iterations", "btard/time_aggregation", "train/loss"):
            assert key in m["metrics"]
    # the layout includes the parameter that never got a gradient: it stays as initialised, everywhere
    assert torch.equal(params[0]["unused.weight"], params[3]["unused.weight"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("options", [(), ("--keep-grads", "--accumulate", "2", "--clip", "0.05")])
def test_btard_with_mean_equals_lightning_ddp(tmp_path, options) -> None:
    # unverified, the gradients become views of the aggregate (no copy); with zero_grad(set_to_none=False) backward
    # then accumulates into those views, which the next step sends without a copy, and clipping scales them in place
    (tmp_path / "btard").mkdir()
    (tmp_path / "ddp").mkdir()
    common = ["--devices", "2", "--steps", "8", *options]
    run_script("train_tiny.py", [str(tmp_path / "btard"), "--aggregator", "mean", *common], timeout=200)
    run_script("train_tiny.py", [str(tmp_path / "ddp"), "--strategy", "ddp_find_unused_parameters_true", *common], timeout=200)
    btard, _ = load_run(tmp_path / "btard", 2)
    ddp, _ = load_run(tmp_path / "ddp", 2)
    for name, value in ddp[0].items():
        assert torch.allclose(btard[0][name], value, atol=2e-6, rtol=1e-5), name
    # both started from the same parameters, and training did move them (the comparison is not trivially true)
    start_btard, start_ddp = torch.load(tmp_path / "btard" / "init1.pt"), torch.load(tmp_path / "ddp" / "init1.pt")
    assert all(torch.equal(start_btard[k], start_ddp[k]) for k in start_ddp)
    assert sum(float((start_ddp[k] - ddp[0][k]).abs().sum()) for k in ddp[0]) > 0.1


@pytest.mark.timeout(300)
def test_manual_optimization_aggregates_at_every_step(tmp_path) -> None:
    run_script("train_tiny.py", [str(tmp_path), "--devices", "2", "--steps", "6", "--manual"], timeout=200)
    params, metrics = load_run(tmp_path, 2)
    assert_identical(params)
    assert all(m["global_step"] == 6 for m in metrics)
    assert "btard/clipped" in metrics[0]["metrics"]


@pytest.mark.timeout(300)
def test_fp16_mixed_precision_with_grad_scaler(tmp_path) -> None:
    run_script("train_tiny.py", [str(tmp_path), "--devices", "2", "--steps", "6", "--precision", "16-mixed"], timeout=200)
    params, metrics = load_run(tmp_path, 2)
    assert_identical(params)
    assert all(m["global_step"] == 6 for m in metrics)


def test_registered_name_and_config_errors() -> None:
    assert "btard" in StrategyRegistry and "btard_spawn" in StrategyRegistry
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="btard", logger=False, enable_checkpointing=False)
    assert isinstance(trainer.strategy, BTARDStrategy)
    assert trainer.strategy.is_distributed and trainer.strategy.num_processes == 2
    with pytest.raises(ValueError, match="tau"):
        BTARDStrategy(tau=0.0)
    with pytest.raises(ValueError, match="unknown aggregator 'bulyan'.*centered_clip"):
        BTARDStrategy(aggregator="bulyan")
    with pytest.raises(ValueError, match="backend"):
        BTARDStrategy(backend="carrier-pigeon")  # type: ignore[arg-type]
    assert BTARDStrategy(start_method="fork", verify=False).verify is False


def test_aggregator_object_is_used_as_is() -> None:
    class Median:
        def __call__(self, parts, weights=None):
            return AggregationResult(parts.median(0).values, {"clipped": 0.0, "iterations": 0.0, "residual": 0.0})

    agg = Median()
    assert BTARDStrategy(aggregator=agg).aggregator is agg
    assert BTARDStrategy(aggregator="mean", tau=5.0).aggregator.__class__.__name__ == "Mean"
    assert BTARDStrategy(tau=0.25).aggregator.tau == 0.25


def test_centered_clip_is_certified_exactly_when_the_rounds_are_verified() -> None:
    """Nobody checks an unverified round's aggregates: its CenteredClip skips the certifying pass (certify=False); a
    verified round's check needs the certified residual, and asking it to skip that is a configuration error."""
    from lightning_btard.sim_strategy import BTARDSimStrategy

    assert BTARDStrategy().aggregator.certify is True
    assert BTARDStrategy(verify=False).aggregator.certify is False
    assert "certify=False" in repr(BTARDStrategy(verify=False).aggregator)
    assert BTARDStrategy(verify=False, aggregator_options={"certify": True}).aggregator.certify is True
    assert BTARDSimStrategy(num_peers=2, verify=False).aggregator.certify is False
    for cls, extra in ((BTARDStrategy, {}), (BTARDSimStrategy, {"num_peers": 2})):
        with pytest.raises(ValueError, match="certify=False"):
            cls(verify=True, aggregator_options={"certify": False}, **extra)


@pytest.mark.timeout(300)
def test_resume_from_checkpoint_continues_identically(tmp_path) -> None:
    ckpt = tmp_path / "step6.ckpt"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_script("train_tiny.py", [str(tmp_path / "a"), "--devices", "2", "--steps", "6", "--save-ckpt", str(ckpt)], timeout=200)
    run_script("train_tiny.py", [str(tmp_path / "b"), "--devices", "2", "--steps", "10", "--resume", str(ckpt)], timeout=200)
    params, metrics = load_run(tmp_path / "b", 2)
    assert_identical(params)
    assert all(m["global_step"] == 10 and m["batches"] == 4 for m in metrics)  # 4 more steps, not 10
    # the resumed run started from the checkpoint's parameters
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    start = torch.load(tmp_path / "b" / "init0.pt")
    assert all(torch.equal(saved[k], start[k]) for k in start)


@pytest.mark.timeout(300)
def test_verified_training_without_attackers_bans_nobody(tmp_path) -> None:
    # on non-IID data (Dirichlet label skew): honest peers whose batches differ in distribution must not accuse each
    # other, and validators rebuild each target's batch from its part of the split
    run_script("train_tiny.py", [str(tmp_path), "--devices", "4", "--steps", "12", "--verify",
                                 "--data-split", '{"kind": "dirichlet", "alpha": 0.3, "seed": 1}'], timeout=240)
    params, metrics = load_run(tmp_path, 4)
    assert_identical(params)
    for m in metrics:
        assert m["bans"] == [] and m["global_step"] == 12
        assert m["metrics"]["btard/peers"] == 4.0 and m["metrics"]["btard/retries"] == 0.0


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("attack", "rank", "start"),
    # one attack per kind of evidence (projection check, signed messages, a missing record); every protocol attack is
    # banned in test_round.py, on the in-process and the hivemind transports
    # rank 0 hosts torch.distributed's store, which the others need for each new group, and under the fork launcher
    # the launching process waits for its result: it is banned under both launchers
    [("WrongAggregate", 2, "fork"), ("EquivocatingAggregate", 0, "fork"), ("WithheldReveal", 0, "popen"), ("WithheldReveal", 3, "fork")],
)
def test_verified_training_bans_a_protocol_attacker_which_leaves_cleanly(tmp_path, attack, rank, start) -> None:
    out = run_script(
        "train_tiny.py",
        [str(tmp_path), "--devices", "4", "--steps", "8", "--verify", "--attack", attack, "--byzantine", str(rank), "--attack-start", "3",
         "--start-method", start],
        timeout=240,
    )
    assert f"this peer (rank {rank}) was banned at step 3" in out.stdout
    if rank == 0 and start == "fork":  # it ended fit() right after its ban, without the others
        assert load_run(tmp_path, [0])[1][0]["global_step"] == 4
    else:  # it left before the end, with exit code 0
        assert not (tmp_path / f"metrics{rank}.json").exists()
    rest = [r for r in range(4) if r != rank]
    params, metrics = load_run(tmp_path, rest)
    assert_identical(params)
    for m in metrics:
        assert [(b["peer"], b["step"]) for b in m["bans"]] == [(rank, 3)]
        assert m["global_step"] == 8 and m["metrics"]["btard/peers"] == 3.0


@pytest.mark.timeout(200)
def test_a_diverged_model_stops_with_a_clear_error_instead_of_sending_nan(tmp_path) -> None:
    """lr=1e30 sends the parameters to inf after one step: the next gradient is NaN on every peer. Sending it would
    get an honest peer banned as a malformed part: the peer stops and says why."""
    out = run_script("train_tiny.py", [str(tmp_path), "--devices", "2", "--steps", "5", "--lr", "1e30", "--verify"], timeout=180, check=False)
    assert out.returncode != 0
    assert "own gradient at step 1 is not finite" in out.stdout and "the model diverged" in out.stdout, out.stdout[-3000:]


def test_the_strategy_pickles_for_spawned_processes() -> None:
    """`strategy="btard_spawn"` (start_method="spawn") pickles the strategy into every process: its buffer caches
    (Workspace, a thread-local) go as empty caches."""
    import pickle

    strategy = BTARDStrategy(start_method="spawn")
    strategy._buffers.get("flat", (4,), torch.float32, torch.device("cpu"))
    copy = pickle.loads(pickle.dumps(strategy))
    assert isinstance(copy, BTARDStrategy) and copy._buffers.buffers == {} and copy.tau == strategy.tau


@pytest.mark.timeout(300)
@pytest.mark.parametrize("by_name", [False, True], ids=["instance", "by-name"])
def test_lightning_pytorch_boring_model_under_btard(tmp_path, by_name: bool) -> None:
    # both Lightning packages are installed here; the script imports lightning.pytorch first, as its docs teach,
    # and sets nothing: lightning_btard must build on lightning.pytorch (lightning_package.py)
    env = base_env()
    env.pop("BTARD_LIGHTNING", None)
    run_script("lightning_unified.py", [str(tmp_path)] + (["--by-name"] if by_name else []), env=env, timeout=240)
    params, metrics = load_run(tmp_path, 2)
    assert_identical(params)
    for m in metrics:
        assert m["global_step"] == 5 and m["bans"] == [] and m["lightning_btard_uses"] == "lightning"
        assert "lightning.pytorch.strategies.strategy.Strategy" in m["strategy_bases"]
        assert not any(base.startswith("pytorch_lightning.") for base in m["strategy_bases"])
        assert m["metrics"]["btard/params_in_sync"] == 1.0


def test_the_lightning_package_is_chosen_by_the_program_then_by_what_is_installed() -> None:
    from lightning_btard.lightning_package import choose

    both = lambda name: True  # noqa: E731
    assert choose({}, {"lightning.pytorch": object()}, both) == "lightning"
    assert choose({}, {"pytorch_lightning": object()}, both) == "pytorch_lightning"
    assert choose({}, {}, both) == "pytorch_lightning"  # the package lightning-btard depends on
    assert choose({}, {}, lambda name: name == "lightning") == "lightning"
    assert choose({"BTARD_LIGHTNING": "lightning"}, {"pytorch_lightning": object()}, both) == "lightning"
    with pytest.raises(ValueError, match="expected one of lightning, pytorch_lightning"):
        choose({"BTARD_LIGHTNING": "lightnin"}, {}, both)
    with pytest.raises(ModuleNotFoundError, match="not installed"):
        choose({"BTARD_LIGHTNING": "lightning"}, {}, lambda name: name == "pytorch_lightning")
    with pytest.raises(ModuleNotFoundError, match="needs Lightning"):
        choose({}, {}, lambda name: False)


@pytest.mark.timeout(300)
def test_parameter_server_baseline_aggregates_whole_vectors_and_keeps_peers_identical(tmp_path) -> None:
    run_script("train_tiny.py", [str(tmp_path), "--devices", "3", "--steps", "6", "--aggregator", "geometric_median",
                                 "--topology", "server", "--aggregator-options", '{"tol": 1e-7}'], timeout=240)
    params, metrics = load_run(tmp_path, 3)
    assert_identical(params)
    for m in metrics:
        assert m["global_step"] == 6 and m["bans"] == []
        assert m["metrics"]["btard/cc_iterations"] >= 1.0  # Weiszfeld's iterations, at peer 0, reported to all
