"""Training loop: 2-process FSDP2 equals 1 process, exact kill-and-resume, corrupt shards counted,
overfitting one batch, export round trip, LoRA merge-and-export."""

import json
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from nextstep.data.config import DataConfig, DatasetSpec
from nextstep.data.format import Sample, write_shards
from nextstep.model.checkpoint import from_pretrained
from nextstep.model.config import NextStepConfig
from nextstep.model.vae import AutoEncoder, VAEConfig, save_vae
from nextstep.train import loop
from nextstep.train.config import (
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainingConfig,
    apply_overrides,
)
from nextstep.train.export import export
from nextstep.train.init import init_model
from nextstep.train.metrics import MetricsWriter
from nextstep.train.optim import lr_factor
from nextstep.train.step import image_targets, train_step
from tests.refs import ROOT
from tests.train.harness import free_port, killed_at

TINY = ROOT / "nextstep11-tiny"
ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, fm_head_dim=32)
CAPTIONS = ["a red cat <image_0>", "a big dog <image_0>", "a red dog <image_0>", "a big cat <image_0>"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(out: Path, **training) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(tokenizer_dir=str(TINY), arch=NextStepConfig(**ARCH), precomputed_latents=True),
        training=TrainingConfig(output_dir=str(out), max_seq_len=64, pad_to_multiple=8, **training),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        parallel=ParallelConfig(param_dtype="float32"),
        logging=LoggingConfig(log_steps=1, progress=False),
    )


def latent_batches(n_batches: int, batch: int, *, rank: int = 0, world: int = 1, seed: int = 0):
    """Global batches of latent samples (16 x 8 x 8 -> 16 tokens each); this rank's slice of each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        samples = [Sample(f"s{b}x{i}", CAPTIONS[i % 4], [torch.randn(16, 8, 8, generator=g)]) for i in range(batch)]
        per = batch // world
        out.append(samples[rank * per : (rank + 1) * per])
    return out


def _fsdp_worker(rank: int, world: int, port: int, out: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    cfg = tiny_cfg(Path(out), max_steps=4, save_steps=0)
    history = loop.train(cfg, data=latent_batches(4, 4, rank=rank, world=world))
    if rank == 0:
        Path(result).write_text(json.dumps(history))
    torch.distributed.destroy_process_group()


def test_two_process_fsdp_matches_one_process(tmp_path):
    single = loop.train(tiny_cfg(tmp_path / "one", max_steps=4, save_steps=0), data=latent_batches(4, 4))
    result = tmp_path / "two.json"
    mp.spawn(_fsdp_worker, args=(2, free_port(), str(tmp_path / "two"), str(result)), nprocs=2)
    double = json.loads(result.read_text())
    for a, b in zip(single, double, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    assert (tmp_path / "two/checkpoints/step-00000004/meta.json").is_file()

    # One process resuming the two-process run: refused unless elastic; then the schedule carries on.
    resume = tiny_cfg(tmp_path / "two", max_steps=6, save_steps=0, resume=True)
    with pytest.raises(ValueError, match="written by 2 processes, resuming with 1.*elastic_resume=true"):
        loop.train(resume, data=latent_batches(2, 4))
    resume.training.elastic_resume = True
    more = loop.train(resume, data=latent_batches(2, 4))
    assert [h["step"] for h in more] == [5, 6]
    # The schedule continues at step 4 (a fresh one would restart the warm-up at 1.5e-3).
    assert [h["lr"] for h in more] == pytest.approx([lr_factor(s, resume) * 3e-3 for s in (4, 5)])


def test_overfits_one_batch(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=300, save_steps=0)
    overrides = ["optim.schedule=constant", "optim.max_grad_norm=0", "optim.lr=1e-2"]
    cfg = apply_overrides(cfg, overrides + ["model.arch.fm_head_dim=64", "model.arch.fm_head_layers=3"])
    history = loop.train(cfg, data=latent_batches(1, 4) * 300)
    first = history[0]["loss"]
    last = np.mean([h["loss"] for h in history[-10:]])
    assert last < first / 10, (first, last)


# ---- through wds.py: tiny VAE, image shards with a corrupt one, crash and resume -------------------


@pytest.fixture
def shard_run(tmp_path):
    torch.manual_seed(0)
    vae = AutoEncoder(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, resolution=32))
    save_vae(vae, tmp_path / "vae")
    rng = np.random.default_rng(0)
    samples = [
        Sample(f"s{i}", CAPTIONS[i % 4], [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))])
        for i in range(24)
    ]
    write_shards(samples, tmp_path / "shards", prefix="d", max_count=6)
    (tmp_path / "shards" / "d-999999.tar").write_bytes(b"this is not a tar file" * 50)
    cfg = tiny_cfg(tmp_path / "run", max_steps=6, save_steps=2)
    cfg.model.precomputed_latents = False
    cfg.model.vae_dir = str(tmp_path / "vae")
    cfg.data = DataConfig(
        datasets=[DatasetSpec(shards=str(tmp_path / "shards"))],
        image_size=32,
        batch_size=2,
        num_workers=0,
        shuffle_buffer=4,
        caption_drop_prob=0.2,
    )
    return cfg


def test_kill_and_resume_reproduces_losses(shard_run, tmp_path, monkeypatch):
    full = loop.train(apply_overrides(shard_run, [f"training.output_dir={tmp_path / 'full'}"]))
    metrics = [json.loads(line) for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert max(m["data/shard_errors"] for m in metrics) >= 1  # the corrupt shard was skipped and counted

    with killed_at(monkeypatch, 5):
        loop.train(shard_run)
    assert (tmp_path / "run/checkpoints/step-00000004").is_dir()
    assert not list((tmp_path / "run/checkpoints").glob("*.tmp"))
    resumed = loop.train(apply_overrides(shard_run, ["training.resume=true"]))
    assert [h["step"] for h in resumed] == [5, 6]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full[4:]]  # exactly equal
    assert [h["grad_norm"] for h in resumed] == [h["grad_norm"] for h in full[4:]]
    ckpts = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004", "step-00000006"]  # keep_last=3

    ref = init_model(shard_run, shard_run.model.arch)
    from nextstep.train.checkpoint import load_model_weights

    load_model_weights(tmp_path / "run/checkpoints/step-00000006", ref)
    whole = export(tmp_path / "run", tmp_path / "exported")
    sharded = export(tmp_path / "run", tmp_path / "sharded", max_shard_mb=0.02)  # 20 kB files
    assert (whole / "model.safetensors").is_file() and len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    for out in (whole, sharded):
        model = from_pretrained(out)
        assert (out / "vae/checkpoint.pt").is_file() and (out / "tokenizer.json").is_file()
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    # The run's sampling defaults go with it: a 32 px model does not default to 512x512.
    from nextstep.sampling.pipeline import Pipeline

    buckets = shard_run.data.resolved_buckets()
    lg = shard_run.logging
    assert json.loads((whole / "sampling_defaults.json").read_text()) == {
        "size": [32, 32],
        "steps": lg.sample_head_steps,
        "cfg": lg.sample_cfg,
        "trained": {"sizes": [list(b) for b in buckets]},
    }
    pipe = Pipeline.from_pretrained(whole, device="cpu")
    assert pipe.defaults["size"] == (32, 32) and pipe.trained.sizes == buckets


def test_signal_saves_and_stops_then_resume_matches(shard_run, tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM: the step finishes, a checkpoint is saved off the save_steps grid, training stops;
    DataLoader workers ignore the signal. Also: logging.profile_steps writes the operator table."""
    cfg = apply_overrides(shard_run, ["data.num_workers=2", "training.save_steps=0"])
    full = loop.train(apply_overrides(cfg, [f"training.output_dir={tmp_path / 'full'}", "logging.profile_steps=1"]))
    assert "aten::" in (tmp_path / "full/profile/ops.txt").read_text()
    real_log = MetricsWriter.log

    def signal_at_3(self, step, values):
        real_log(self, step, values)
        if step == 3:  # as `timeout` or a scheduler does: SIGTERM to the workers too, not just the main process
            workers = multiprocessing.active_children()
            assert len(workers) == 2
            for w in workers:
                os.kill(w.pid, signal.SIGTERM)
            for w in workers:
                w.join(timeout=0.5)  # a worker that died here would make the DataLoader raise, unsaved
            assert all(w.is_alive() for w in workers)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsWriter, "log", signal_at_3)
    stopped = loop.train(cfg)
    monkeypatch.setattr(MetricsWriter, "log", real_log)
    assert [h["step"] for h in stopped] == [1, 2, 3]
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["step-00000003"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after train()
    resumed = loop.train(apply_overrides(cfg, ["training.resume=true"]))
    assert [h["loss"] for h in stopped + resumed] == [h["loss"] for h in full]


def test_lora_trains_adapters_and_exports_merged(tmp_path):
    pytest.importorskip("peft")
    base = tiny_cfg(tmp_path / "base", max_steps=1, save_steps=0)
    loop.train(base, data=latent_batches(1, 2))
    first = export(tmp_path / "base", tmp_path / "base_export")
    cfg = tiny_cfg(tmp_path / "lora", max_steps=3, save_steps=0)
    cfg = apply_overrides(cfg, ["model.init=pretrained", f"model.path={first}", "lora.enabled=true", "lora.rank=4"])
    cfg.model.vae_dir = ""
    loop.train(cfg, data=latent_batches(3, 2))
    merged = from_pretrained(export(tmp_path / "lora", tmp_path / "lora_export"))
    before = from_pretrained(first)
    names = set(merged.state_dict())
    assert names == set(before.state_dict())  # plain official names, no lora_ / base_layer
    q = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], before.state_dict()[q])  # adapters were merged in


def test_bf16_single_process_fsdp_with_samples_and_tensorboard(shard_run, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = apply_overrides(
        shard_run,
        [
            "parallel.param_dtype=bfloat16",  # one-rank FSDP2 mixed precision
            "parallel.reshard_after_forward=false",  # as configs/shapes.py
            "training.max_steps=2",
            "logging.sample_steps=2",
            "logging.sample_size=32",
            "logging.sample_head_steps=2",
            "logging.tensorboard=true",
            '["a red cat"]'.join(["logging.sample_prompts=", ""]),
        ],
    )
    try:
        history = loop.train(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert all(np.isfinite(h["loss"]) for h in history)
    images = list((tmp_path / "run/samples").glob("step00000002_*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == (32, 32)
    assert list((tmp_path / "run/tb").glob("events.*"))


def test_torchrun_cli_runs_a_preset_and_rejects_bad_overrides(shard_run, tmp_path):
    import subprocess
    import sys

    data = json.dumps([{"shards": shard_run.data.datasets[0].shards}])
    overrides = [
        f"data.datasets={data}",
        "data.image_size=32",
        "training.max_steps=2",
        "training.save_steps=1",
        f"training.output_dir={tmp_path / 'cli'}",
        "logging.progress=false",
    ]
    root = Path(__file__).parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "configs.debug"]
    done = subprocess.run(cmd + overrides, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resolved config" in done.stderr
    assert sorted(p.name for p in (tmp_path / "cli/checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    saved = json.loads((tmp_path / "cli/checkpoints/step-00000002/config.json").read_text())
    assert saved["training"]["max_steps"] == 2 and saved["data"]["image_size"] == 32
    assert loop.main(["-m", "configs.debug", "training.max_stepz=2"]) == 2


def test_resume_flag_anywhere_and_one_line_errors(shard_run, tmp_path, capsys, caplog):
    """`--resume` before, between or after the overrides; a resume after an architecture change and a dataset
    without readable samples are one `nextstep: error:` line (exit 2), not a traceback."""
    data = json.dumps([{"shards": shard_run.data.datasets[0].shards}])
    common = [
        f"data.datasets={data}",
        "data.image_size=32",
        f"model.vae_dir={shard_run.model.vae_dir}",
        "training.save_steps=1",
        f"training.output_dir={tmp_path / 'run'}",
        "logging.progress=false",
    ]
    assert loop.main(["-m", "configs.debug", "training.max_steps=1", *common]) == 0
    with caplog.at_level("INFO", logger="nextstep.train.run"):
        assert loop.main(["-m", "configs.debug", "training.max_steps=2", "--resume", *common[:2], *common[2:]]) == 0
        assert loop.main(["--resume", "-m", "configs.debug", *common, "training.max_steps=3"]) == 0
    assert "at step 1" in caplog.text and "at step 2" in caplog.text
    capsys.readouterr()

    assert (
        loop.main(["-m", "configs.debug", *common, "training.max_steps=4", "model.arch.hidden_size=32", "--resume"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("nextstep: error:") == 1 and "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith("nextstep: error: checkpoint ") and "was written by a model of other shapes: " in line
    assert "(64,) there, (32,) here" in line or ", 64) there, " in line, line

    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 100)
    empty = [
        f"data.datasets={json.dumps([{'shards': str(bad), 'name': 'broken'}])}",
        f"training.output_dir={tmp_path / 'e'}",
    ]
    assert loop.main(["-m", "configs.debug", *common, *empty, "training.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == "nextstep: error: dataset 'broken': no readable samples in its 1 shard(s)"


def test_image_targets_are_in_placeholder_order_across_shape_groups():
    """Images of two bucket shapes, interleaved in the sequence: the targets follow placeholder order."""
    from nextstep.model.nextstep import patchify
    from nextstep.train.sequences import TrainBatch

    g = torch.Generator().manual_seed(0)
    wide, tall = torch.randn(4, 16, 4, 6, generator=g), torch.randn(3, 16, 6, 4, generator=g)
    groups = [([5, 0, 2, 6], wide), ([1, 4, 3], tall)]
    batch = TrainBatch(None, None, None, None, groups, list(range(7)), [6] * 7, 0, [], 7)
    want: list = [None] * 7
    for idx, x in groups:
        for j, i in enumerate(idx):
            want[i] = patchify(x, 2)[j]
    torch.testing.assert_close(image_targets(batch, None, 2), torch.cat(want), rtol=0, atol=0)
    one = TrainBatch(None, None, None, None, [([0, 1, 2, 3], wide)], list(range(4)), [6] * 4, 0, [], 4)
    torch.testing.assert_close(image_targets(one, None, 2), patchify(wide, 2).reshape(24, 64), rtol=0, atol=0)


def test_elastic_resume_with_another_worker_count(shard_run, tmp_path, caplog):
    """The loader position is per worker: a resume with another data.num_workers is refused unless
    training.elastic_resume, which restores model, optimizer and schedule and starts the next data epoch."""
    loop.train(apply_overrides(shard_run, ["training.max_steps=4"]))
    more = apply_overrides(shard_run, ["training.resume=true", "data.num_workers=2"])
    with pytest.raises(ValueError, match="num_workers.*elastic_resume=true"):
        loop.train(more)
    with caplog.at_level("WARNING"):
        resumed = loop.train(apply_overrides(more, ["training.elastic_resume=true"]))
    assert [h["step"] for h in resumed] == [5, 6]
    assert "the data restarts at epoch 1" in caplog.text


def test_image_input_noise_noises_the_inputs_not_the_targets(tmp_path, monkeypatch):
    from nextstep.model.nextstep import NextStep

    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    original = NextStep.forward_train

    def spy(self, input_ids, labels, image_tokens, **kw):
        seen.append((image_tokens.detach().clone(), kw.get("image_inputs")))
        return original(self, input_ids, labels, image_tokens, **kw)

    monkeypatch.setattr(NextStep, "forward_train", spy)
    plain = loop.train(tiny_cfg(tmp_path / "plain", max_steps=2, save_steps=0), data=latent_batches(2, 4))
    noisy = loop.train(
        tiny_cfg(tmp_path / "noisy", max_steps=2, save_steps=0, image_input_noise=0.5), data=latent_batches(2, 4)
    )
    (t_plain, i_plain), (t_noisy, i_noisy) = seen[0], seen[2]
    assert i_plain is None and torch.equal(t_plain, t_noisy)  # same targets
    delta = (i_noisy.detach() - t_noisy).reshape(4, 16, -1)  # 4 images of 16 tokens
    assert (delta.std(dim=(1, 2)) < 0.5 * 1.25).all() and delta.abs().max() > 0
    assert plain[0]["loss"] != pytest.approx(noisy[0]["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="image_input_noise must be in \\[0, 10\\], got -1"):
        TrainingConfig(image_input_noise=-1)


def test_another_step_keeps_build_checkpoint_and_log(tmp_path):
    """A training mode replaces the step (here the NextStep step plus a metric of its own) and keeps the
    loop's build, log and checkpoints; the same batches give the same losses as the default step."""
    calls = []

    def step(run):
        calls.append(run.step)
        out = train_step(run)
        out.metrics["double_loss"] = 2 * out.metrics["loss"]
        return out

    own = loop.train(tiny_cfg(tmp_path / "own", max_steps=3, save_steps=2), data=latent_batches(3, 2), step_fn=step)
    plain = loop.train(tiny_cfg(tmp_path / "plain", max_steps=3, save_steps=2), data=latent_batches(3, 2))
    assert calls == [0, 1, 2]
    assert [h["loss"] for h in own] == [h["loss"] for h in plain]
    assert [h["double_loss"] for h in own] == pytest.approx([2 * h["loss"] for h in own])
    logged = [json.loads(line) for line in (tmp_path / "own/metrics.jsonl").read_text().splitlines()]
    assert [m["double_loss"] for m in logged] == pytest.approx([2 * m["loss"] for m in logged])
    assert sorted(p.name for p in (tmp_path / "own/checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
