"""The RL training mode on the loop: a few steps of the tiny reference model raise a simple image reward and
export; kill and resume reproduce the rewards of every step; LoRA; the presets resolve and bad values are
named."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from nextstep.model.checkpoint import from_pretrained
from nextstep.train import loop
from nextstep.train.config import (
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RLConfig,
    TrainConfig,
    TrainingConfig,
    apply_overrides,
    resolve,
)
from nextstep.train.export import export
from tests.refs import ROOT
from tests.train.harness import free_port, killed_at

TINY = ROOT / "nextstep11-tiny"


def left_brightness(images, prompts, meta) -> torch.Tensor:
    """Mean luminance of the left half. The tiny VAE's last GroupNorm keeps a whole image's mean brightness
    nearly fixed, while a half of it moves ten times more with the tokens."""
    return torch.tensor(
        [float(np.asarray(im.convert("L"), np.float32)[:, : im.width // 2].mean()) / 255 for im in images]
    )


pytestmark = pytest.mark.usefixtures("one_thread")


def rl_cfg(out, **rl) -> TrainConfig:
    """The tiny NextStep-1.1 reference, 32 px rollouts of 2 x 2 tokens, 4 head steps."""
    base = dict(group_size=4, prompts_per_step=4, prompt_pool=16, image_size=32, head_steps=4, train_steps=[0, 1, 2])
    return TrainConfig(
        model=ModelConfig(init="pretrained", path=str(TINY)),
        training=TrainingConfig(mode="rl", output_dir=str(out), max_steps=6, save_steps=0),
        optim=OptimConfig(lr=3e-2, warmup_steps=0, schedule="constant", weight_decay=0.0),
        parallel=ParallelConfig(param_dtype="float32"),
        logging=LoggingConfig(log_steps=1, progress=False),
        rl=RLConfig(**{**base, "steps_per_rollout": 0, "reward": f"{__name__}:left_brightness", **rl}),
    )


def test_rl_steps_raise_the_reward_and_export(tmp_path):
    cfg = apply_overrides(rl_cfg(tmp_path / "run"), ["training.save_steps=3", "logging.sample_steps=3"])
    history = loop.train(cfg)
    rewards = [h["reward_mean"] for h in history]
    assert np.mean(rewards[-2:]) > np.mean(rewards[:2]) + 0.01, rewards
    assert all(h["ratio_dev"] < 1e-3 for h in history)  # on-policy: the update's ratio is 1 up to numerics
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    for key in ("reward_mean", "reward_std", "kept_groups", "kl", "clip_frac", "tokens_per_s", "grad_norm"):
        assert all(np.isfinite(m[key]) for m in logged), key
    assert logged[0]["kept_groups"] == 4
    from PIL import Image

    grid = Image.open(tmp_path / "run/samples/rollout_step00000003.png")
    assert grid.size == (4 * 32, 4 * 32)  # a group per row
    out = export(tmp_path / "run", tmp_path / "exported")
    trained, start = from_pretrained(out), from_pretrained(TINY)
    name = "image_head.net.input_proj.weight"
    assert not torch.equal(trained.state_dict()[name], start.state_dict()[name])


def test_kill_and_resume_reproduce_the_rewards(tmp_path, monkeypatch):
    """Shapes prompts with half the groups edits, one random trained step per rollout on a rollout policy kept
    across steps (an engine state per trained step), and the KL term to the start model."""
    rl = dict(prompts="shapes", steps_per_rollout=1, kl_weight=0.05, edit_fraction=0.5, rollout_states=3)
    cfg = rl_cfg(tmp_path / "run", **rl)
    cfg = apply_overrides(cfg, ["training.max_steps=4", "training.save_steps=2"])
    full = loop.train(apply_overrides(cfg, [f"training.output_dir={tmp_path / 'full'}"]))
    assert full[0]["kl"] == 0 and full[-1]["kl"] > 0  # the policy moves away from the reference
    with killed_at(monkeypatch, 3):
        loop.train(cfg)
    resumed = loop.train(apply_overrides(cfg, ["training.resume=true"]))
    assert [h["step"] for h in resumed] == [3, 4]
    for key in ("reward_mean", "reward_std", "loss", "kl", "edit_reward_mean"):
        assert [h[key] for h in resumed] == [h[key] for h in full[2:]], key  # exactly equal
    assert all(np.isfinite(h["edit_reward_mean"]) for h in full)


def test_sigint_to_the_process_group_while_the_reward_pool_scores_saves_and_resumes(tmp_path):
    """`timeout --signal=INT` signals the whole process group, the reward pool's workers too: they ignore it, the
    step finishes with their scores, a checkpoint is saved, the run stops cleanly, and a resume continues."""
    env = {**os.environ, "SIGNAL_RUN_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])}

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "tests.rl.signal_run", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)

    stopped = run()
    assert stopped.returncode == 0 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert (tmp_path / "fired").is_file() and len(list(tmp_path.glob("busy-*"))) == 2  # mid-batch, both busy
    assert "stopped by signal at step 2" in stopped.stderr and "lost a worker" not in stopped.stderr
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["step-00000002"]
    assert [h["step"] for h in json.loads((tmp_path / "history.json").read_text())] == [1, 2]
    resumed = run("--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((tmp_path / "history-resumed.json").read_text())
    assert [h["step"] for h in history] == [3, 4] and all(np.isfinite(h["reward_mean"]) for h in history)


def test_lora_rl_trains_adapters_on_file_prompts(tmp_path):
    pytest.importorskip("peft")
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue star on the left\n")  # prompts from a file
    overrides = ["training.max_steps=2", "lora.enabled=true", "lora.rank=4", f"rl.prompts=file:{tmp_path}/prompts.txt"]
    cfg = apply_overrides(rl_cfg(tmp_path / "run"), overrides)
    history = loop.train(cfg)
    assert all(np.isfinite(h["loss"]) for h in history)
    merged = from_pretrained(export(tmp_path / "run", tmp_path / "exported"))
    q = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], from_pretrained(TINY).state_dict()[q])


def test_presets_resolve_and_bad_values_are_named(tmp_path, capsys):
    shapes = resolve("configs.rl_shapes", [])
    assert shapes.training.mode == "rl" and shapes.rl.reward.startswith("shapes") and shapes.rl.prompts == "shapes"
    for name in ("configs.rl_nextstep11_14b", "configs.rl_nextstep11_1b"):
        assert resolve(name, []).training.mode == "rl"
    assert loop.main(["-m", "configs.rl_shapes", "rl.rule=ode"]) == 2
    assert "rl.rule must be sde or cps" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rl.train_steps must be a non-empty subset of 0..3, got \\[4\\]"):
        RLConfig(head_steps=4, train_steps=[0, 4])
    with pytest.raises(ValueError, match="rl.edit_fraction must be in \\[0, 1\\], got 1.5"):
        RLConfig(edit_fraction=1.5)
    with pytest.raises(ValueError, match="rl.edit_fraction > 0 needs rl.prompts 'shapes'.*'file:p.txt'"):
        RLConfig(edit_fraction=0.5, prompts="file:p.txt")
    with pytest.raises(ValueError, match="rl.rollout_states must be >= 0, got -1"):
        RLConfig(rollout_states=-1)
    with pytest.raises(ValueError, match="needs the VAE"):
        apply_overrides(rl_cfg(tmp_path), ["model.precomputed_latents=true"])
    bad = rl_cfg(tmp_path / "bad", prompts=f"file:{tmp_path / 'missing.txt'}")
    with pytest.raises(ValueError, match="missing.txt.*does not exist"):
        loop.train(bad)


def test_bf16_single_process_fsdp_rl_step(tmp_path):
    """The GPU presets' layout on CPU: FSDP2 mixed precision in one process, the teacher-forced forward through
    the registered FSDP methods, a bf16 rollout copy and reference model."""
    cfg = apply_overrides(
        rl_cfg(tmp_path / "run"), ["parallel.param_dtype=bfloat16", "training.max_steps=2", "rl.kl_weight=0.1"]
    )
    try:
        history = loop.train(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in history)
    assert all(h["ratio_dev"] < 0.1 for h in history)  # bf16 numerics only
    assert history[-1]["kl"] > history[0]["kl"]


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    cfg = apply_overrides(rl_cfg(out), ["training.max_steps=2", "rl.prompts_per_step=2", "rl.kl_weight=0.1"])
    history = loop.train(cfg)
    if rank == 0:
        (Path(out) / "history.json").write_text(json.dumps(history))
    torch.distributed.destroy_process_group()


def test_two_process_fsdp_rl(tmp_path):
    """Two ranks sharded with FSDP2: each gathers its own rollout copy and rolls out its own prompts; the
    update and the KL term run through the sharded model."""
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path / "run")), nprocs=2)
    history = json.loads((tmp_path / "run/history.json").read_text())
    assert [h["step"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and h["ratio_dev"] < 1e-3 for h in history)
    assert history[0]["kl"] == 0 and history[1]["kl"] > 0
    assert (tmp_path / "run/checkpoints/step-00000002/meta.json").is_file()


def test_the_reward_pool_is_stopped_when_training_ends(tmp_path, monkeypatch):
    """A run that scored its rewards in the process pool leaves no worker behind once train() returns."""
    from nextstep.rl import rewards

    monkeypatch.setattr(rewards, "POOL_MIN", 16)
    monkeypatch.setattr(rewards, "_workers", lambda: 2)
    started = []
    real = rewards.ProcessPoolExecutor
    monkeypatch.setattr(rewards, "ProcessPoolExecutor", lambda *a, **k: started.append(real(*a, **k)) or started[-1])
    cfg = apply_overrides(rl_cfg(tmp_path / "run", prompts="shapes", reward="shapes"), ["training.max_steps=1"])
    loop.train(cfg)
    assert len(started) == 1 and rewards._pool is None  # the 16 images went to a pool, which is gone
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("SpawnProcess")]
