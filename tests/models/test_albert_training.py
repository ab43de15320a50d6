"""A tiny ALBERT through the CLI (``configs/albert_tiny.yaml``): under BTARD and under Lightning's DDP, unchanged;
a label-flipping attacker banned after a resume from a checkpoint, as in the paper's attack episodes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from procs import ROOT, SCRIPTS, assert_identical, base_env, load_run, run_command

from datamodules import WikiText103DataModule

CONFIG = str(ROOT / "configs" / "albert_tiny.yaml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The synthetic corpus, tokenizer and instances of albert_tiny.yaml, prepared once for the module's runs."""
    data = tmp_path_factory.mktemp("albert") / "data"
    WikiText103DataModule(
        str(data), synthetic=True, train_tokenizer=True, tokenizer_vocab_size=1000, max_seq_length=64
    ).prepare_data()
    return data


def btard_fit(tmp_path: Path, data: Path, out: Path, *args: str, timeout: float = 400, fork: bool = True):
    """``btard fit`` of the tiny config; ranks are forked from the CLI process unless ``fork=False`` (Lightning's popen
    launcher re-running the CLI per rank, as users run it: slower, each rank imports everything again)."""
    cmd = [
        sys.executable, "-m", "lightning_btard.cli", "fit", "--config", CONFIG,
        f"--data.data_dir={data}", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
        "--trainer.callbacks+=record_run.RecordRun", f"--trainer.callbacks.out_dir={out}",
        *args,
    ]
    if fork and not any(a.startswith("--trainer.strategy=") for a in args):
        cmd.append("--trainer.strategy.start_method=fork")
    env = base_env({"PYTHONPATH": os.pathsep.join([str(ROOT), str(SCRIPTS)])})
    return run_command(cmd, timeout=timeout, env=env, cwd=tmp_path)


def losses(metrics: dict) -> list[float]:
    return [loss for _, loss in metrics["losses"]]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.slow
@pytest.mark.timeout(500)
@pytest.mark.parametrize("strategy", ["btard", "ddp"])
def test_tiny_albert_trains_to_identical_parameters(tmp_path, corpus, strategy) -> None:
    extra = ["--trainer.strategy=ddp_fork"] if strategy == "ddp" else []
    out = btard_fit(tmp_path, corpus, tmp_path / "run", "--trainer.devices=3", "--trainer.max_steps=60", *extra,
                    fork=strategy == "ddp")  # BTARD as users launch it, once
    params, metrics = load_run(tmp_path / "run", 3)
    assert_identical(params)
    for m in metrics:
        assert m["global_step"] == 60 and m["bans"] == []
        first, last = mean(losses(m)[:10]), mean(losses(m)[-10:])
        assert last < first - 0.4, (first, last)  # ln(1000) + ln(2) = 7.6 at the start
    if strategy == "btard":
        assert "BTARD: 0 peer(s) banned during the run." in out.stdout
        assert metrics[0]["metrics"]["btard/validations"] >= 1.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_attack_episode_resumed_from_a_checkpoint_bans_the_label_flipper(tmp_path, corpus) -> None:
    """Train 8 steps and checkpoint; resume with LabelFlipping from step 12 (accumulation 2, as the paper's
    accumulated micro-batches): the attacker is banned by recomputation, nobody else, and the rest go on."""
    ckpts = tmp_path / "ckpts"
    common = ["--trainer.devices=4", "--trainer.accumulate_grad_batches=2"]
    btard_fit(
        tmp_path, corpus, tmp_path / "clean", *common, "--trainer.max_steps=8",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={ckpts}",
        "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_last=true",
    )
    assert (ckpts / "last.ckpt").is_file()
    out = btard_fit(
        tmp_path, corpus, tmp_path / "attacked", *common, "--trainer.max_steps=50",
        "--config", str(ROOT / "configs" / "attacks" / "label_flipping.yaml"),
        "--trainer.callbacks.byzantine=[3]", "--trainer.callbacks.attack_start=12",
        f"--ckpt_path={ckpts / 'last.ckpt'}",
    )
    assert "peer 3: LabelFlipping fired at step 12 (1 times so far)" in out.stdout
    assert "this peer (rank 3) was banned" in out.stdout
    params, metrics = load_run(tmp_path / "attacked", [0, 1, 2])
    assert_identical(params)
    for m in metrics:
        assert m["global_step"] == 50
        assert [(b["peer"], b["evidence"]) for b in m["bans"]] == [(3, "recomputation")]
        # the one validator per step is drawn by the MPRNG: it checks the attacker only in steps it is not validating
        # itself, and escaping one check makes its validating in the next likelier: it escapes a step with probability
        # 0.77, so it is banned by step 16 only 65% of the time (a run here took until step 19); it escapes the 37
        # validated attack steps (12-48) with probability ~8e-5 (through step 30: 1.3%)
        assert 12 < m["bans"][0]["step"] < 50
        assert min(step for step, _ in m["losses"]) == 8  # resumed at step 8, not from scratch
