"""The `btard` CLI: every shipped config parses, attacks swap in from YAML, user errors print one message."""

from __future__ import annotations

import sys

import pytest
from procs import ROOT, base_env, run_command

from lightning_btard.cli import main

ATTACK_CONFIGS = sorted((ROOT / "configs" / "attacks").glob("*.yaml"))


def print_config(capsys, *configs: str, extra: tuple[str, ...] = ()) -> str:
    args = ["fit"] + [a for c in configs for a in ("--config", str(ROOT / "configs" / c))] + list(extra) + ["--print_config"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code in (0, None)
    return capsys.readouterr().out


def test_paper_config_parses_with_the_papers_settings(capsys) -> None:
    out = print_config(capsys, "resnet18_cifar10.yaml")
    for expected in ("lightning_btard.BTARDStrategy", "tau: 1.0", "devices: 16", "models.ResNet18", "batch_size: 8", "nesterov: true", "max_steps: 25000"):
        assert expected in out, expected


@pytest.mark.parametrize("attack", ATTACK_CONFIGS, ids=lambda p: p.stem)
def test_attack_configs_add_their_callback(capsys, attack) -> None:
    out = print_config(capsys, "resnet18_cifar10.yaml", f"attacks/{attack.name}")
    assert "lightning_btard.attacks." in out and "attack_start: 1000" in out and "- 15" in out


def test_attacks_swap_in_from_the_command_line(capsys) -> None:
    out = print_config(
        capsys, "demo.yaml",
        extra=("--trainer.callbacks+=lightning_btard.attacks.LabelFlipping", "--trainer.callbacks.byzantine=[1,3]", "--trainer.callbacks.attack_start=7"),
    )
    assert "lightning_btard.attacks.LabelFlipping" in out and "attack_start: 7" in out


def test_bad_strategy_argument_is_refused_with_one_message(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.strategy.init_args.aggregator=bulyan"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown aggregator 'bulyan'; registered: ['bucketing', 'centered_clip', 'coordinate_median'" in err and "'krum'" in err


@pytest.mark.timeout(180)
def test_missing_data_prints_one_clear_message(tmp_path) -> None:
    cmd = [
        sys.executable, "-m", "lightning_btard.cli", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        "--trainer.devices=2", f"--data.init_args.data_dir={tmp_path}", "--data.init_args.download=false",
        "--data.init_args.synthetic=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    out = run_command(cmd, timeout=150, env=base_env(), check=False)
    assert out.returncode == 2
    assert "btard: error: CIFAR-10 not found" in out.stdout and "write_synthetic_cifar10" in out.stdout
    assert "Traceback" not in out.stdout
