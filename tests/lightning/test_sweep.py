"""btard sweep: the grid, one table, both figures, resume; and the parsing of a sweep config."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml
from procs import base_env, run_command

from lightning_btard.errors import UserError
from lightning_btard.sweep import Sweep


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cells_are_the_product_of_the_axes_in_order(tmp_path) -> None:
    sweep = Sweep(write(tmp_path / "s.yaml", {"name": "s", "axes": {
        "attack": {"none": [], "sf": ["--a=1"]}, "defence": {"x": ["--b=1"], "y": ["--b=2"], "z": []}}}))
    cells = sweep.cells()
    assert [c.name for c in cells] == ["none__x", "none__y", "none__z", "sf__x", "sf__y", "sf__z"]
    assert cells[4].options == ["--a=1", "--b=2"] and cells[4].labels == {"attack": "sf", "defence": "y"}
    with pytest.raises(UserError, match="needs 'axes'"):
        Sweep(write(tmp_path / "bad.yaml", {"name": "bad"}))
    with pytest.raises(UserError, match="axis 'a' must map labels"):
        Sweep(write(tmp_path / "bad2.yaml", {"axes": {"a": ["x"]}}))


def test_attackers_of_a_cell_from_its_saved_config_list_or_draw(tmp_path) -> None:
    from lightning_btard.sweep import byzantine_of

    callbacks = [{"class_path": "lightning_btard.attacks.SignFlipping", "init_args": {"byzantine": {"sample": 7, "peers": 16, "seed": 0}}},
                 {"class_path": "lightning_btard.attacks.LabelFlipping", "init_args": {"byzantine": [2]}},
                 {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {}}]
    (tmp_path / "v0").mkdir()
    (tmp_path / "v0" / "config.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    assert byzantine_of(tmp_path) == {1, 5, 7, 9, 13, 14, 15, 2}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_small_sweep_writes_the_table_and_figures_and_resumes(tmp_path) -> None:
    config = write(tmp_path / "tiny.yaml", {
        "name": "tiny",
        "configs": ["configs/demo.yaml"],
        # 3 peers simulated in each cell's one process (the sweep's machinery is the subject; btard_sim is as N processes)
        "options": ["--trainer.devices=1", "--trainer.strategy=lightning_btard.BTARDSimStrategy", "--trainer.strategy.num_peers=3",
                    # 34 steps: the one validator per step checks the attacker only in steps it is not validating
                    # itself (then with probability 1/2), and escaping one check makes its validating in the next
                    # likelier: it escapes a step with probability 0.73 (not 2/3), the 31 validated attack steps with
                    # probability ~5e-5 (30 steps: 2e-4)
                    "--trainer.max_steps=34", "--trainer.val_check_interval=10", "--data.val_subset=100",
                    f"--data.data_dir={tmp_path / 'data'}"],
        "attack_start": 2,
        "axes": {
            "attack": {"none": [], "sign_flipping": ["--config", "configs/attacks/sign_flipping.yaml",
                                                     "--trainer.callbacks.byzantine=[1]", "--trainer.callbacks.attack_start=2"]},
            "defence": {"btard": ["--trainer.strategy.tau=1"], "mean": ["--trainer.strategy.aggregator=mean"]},
        },
    })
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lightning_btard.cli", "sweep", "--config", str(config), "--out", str(out), "--jobs", "2", "--cell-timeout", "200"]
    first = run_command(cmd, timeout=560, env=base_env(), cwd=tmp_path)
    assert "4 cells over attack (2) x defence (2)" in first.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["attack"], r["defence"]) for r in rows] == [("none", "btard"), ("none", "mean"), ("sign_flipping", "btard"),
                                                           ("sign_flipping", "mean")]
    by = {(r["attack"], r["defence"]): r for r in rows}
    assert all(r["status"] == "ok" and r["honest_bans"] == "" and float(r["final_acc"]) >= 0 for r in rows)
    assert by[("sign_flipping", "btard")]["bans"] == "1"  # the attacker, by recomputation
    assert by[("sign_flipping", "mean")]["bans"] == "" and by[("none", "btard")]["bans"] == ""
    assert json.loads((out / "results.json").read_text())[2]["steps_to_last_ban"] >= 2
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "heatmap.png").stat().st_size > 5_000
    # run again: every cell is done, nothing is retrained (the training logs are untouched)
    logs = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/train.log")}
    again = run_command(cmd, timeout=120, env=base_env(), cwd=tmp_path)
    assert again.stdout.count(": ok, final acc") == 4 and len(logs) == 4
    assert all(p.stat().st_mtime_ns == t for p, t in logs.items())
