"""smartrun / nextstep launch: the torchrun command for one node and for several."""

import sys

import pytest

from nextstep.train.launch import build_command, main


def test_single_node_command():
    cmd = build_command("configs.shapes", ["training.max_steps=10"], nproc_per_node=8, env={})
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=8" in cmd and "--standalone" in cmd and "--nnodes=1" in cmd
    assert cmd[-3:] == ["-m", "configs.shapes", "training.max_steps=10"]


def test_multi_node_command_reads_the_environment():
    env = {"NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "6000"}
    cmd = build_command("configs.nextstep_qwen14b_512px", [], nproc_per_node=8, env=env)
    for arg in ("--nnodes=4", "--node_rank=2", "--master_addr=10.1.2.3", "--master_port=6000"):
        assert arg in cmd
    assert "--standalone" not in cmd
    with pytest.raises(ValueError, match="needs MASTER_ADDR"):
        build_command("configs.x", [], nproc_per_node=8, env={"NNODES": "2", "NODE_RANK": "0"})


def test_dry_run_prints_and_does_not_run(capsys, monkeypatch):
    monkeypatch.delenv("NNODES", raising=False)
    assert main(["-m", "configs.debug", "--dry-run", "--nproc-per-node", "2", "training.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run --nproc_per_node=2" in out and out.strip().endswith("training.max_steps=3")


def test_resume_anywhere_is_passed_to_the_preset(capsys, monkeypatch):
    monkeypatch.delenv("NNODES", raising=False)
    assert main(["-m", "configs.debug", "training.max_steps=3", "--resume", "data.seed=1", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().endswith("-m configs.debug training.max_steps=3 data.seed=1 --resume")
