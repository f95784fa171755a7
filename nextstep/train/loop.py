"""The training loop: build the run, then step, log, sample and checkpoint until max_steps or a signal; one
plain process or one process per GPU under torchrun (FSDP2).

nextstep train -m configs.shapes training.max_steps=1000 training.save_steps=200 data.num_workers=2
nextstep train -m configs.rl_shapes   (training.mode=rl: RL post-training, nextstep.rl.step)
torchrun --nproc_per_node=8 -m configs.nextstep_qwen14b_512px training.resume=true
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable

import torch.distributed as dist

from nextstep.args import ArgumentParser
from nextstep.train.checkpoint import latest_checkpoint
from nextstep.train.config import TrainConfig, resolve
from nextstep.train.metrics import StepLog, write_samples
from nextstep.train.profiler import StepProfiler
from nextstep.train.run import build_run, resume_run, save_run
from nextstep.train.signals import StopRequest
from nextstep.train.step import StepFn, train_step

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, *, data: Iterable | None = None, step_fn: StepFn | None = None) -> list[dict[str, float]]:
    """Run (or resume) training; returns this run's per-step metrics (rank 0 logs them too).
    `data`: optional iterable of per-rank Sample lists instead of the wds.py loader; `step_fn`: one
    optimizer step of the run, by default training.mode's (`nextstep.train.step.train_step` for sft,
    `nextstep.rl.step.RLStep` for rl, which samples its own rollouts and reads no data); a step_fn with a
    `close()` is closed when training ends."""
    if step_fn is None and cfg.training.mode == "rl":
        from nextstep.rl.step import RLStep

        step_fn = RLStep()
    if cfg.training.mode == "rl" and data is None:
        data = ()  # no loader: an RL step makes its own samples
    step_fn = step_fn or train_step
    run = build_run(cfg, data=data)
    resume_run(run)
    t_cfg, lg = cfg.training, cfg.logging
    steps = StepLog(
        cfg, rank=run.rank, world=run.world, device=run.device, start_step=run.step, data_stats=run.batches.stats
    )
    profiler = StepProfiler(run.out_dir / "profile", start=run.step + 5, steps=lg.profile_steps, enabled=run.rank == 0)
    run.model.train()
    stop = StopRequest()
    try:
        while run.step < t_cfg.max_steps:
            out = step_fn(run)
            run.step += 1
            profiler.step(run.step)
            steps.record(run.step, out)
            if lg.sample_steps and run.step % lg.sample_steps == 0:
                write_samples(cfg, run.model, run.vae, run.tokenizer, steps.writer, run.step, run.device)
            stopping = stop.agreed(run.step, every=lg.log_steps, device=run.device)
            if (t_cfg.save_steps and run.step % t_cfg.save_steps == 0) or run.step == t_cfg.max_steps or stopping:
                save_run(run)
            if stopping:
                log.warning("stopped by signal at step %d; continue with --resume", run.step)
                break
    finally:
        stop.close()
        if hasattr(step_fn, "close"):  # e.g. RLStep's reward pool
            step_fn.close()
    profiler.close()
    steps.close()
    if cfg.checkpoint.export_final and run.rank == 0:
        from nextstep.train.export import export

        export(latest_checkpoint(run.ckpt_root), run.out_dir / "final")
    return steps.history


def main(argv: list[str] | None = None, *, base: TrainConfig | None = None) -> int:
    """`nextstep train -m configs.NAME [--resume] key=value ...` (--resume anywhere among the overrides);
    presets run this as their __main__. A bad config or data, or a resume that cannot work, is one
    `nextstep: error:` line and exit status 2."""
    parser = ArgumentParser(prog="nextstep train", description="train NextStep")
    parser.add_argument("-m", "--module", "--config", dest="preset", help="preset, e.g. configs.shapes")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=1000")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if base is None and not args.preset:
        parser.error("give a preset with -m configs.NAME")
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    overrides = args.overrides + (["training.resume=true"] if args.resume else [])
    try:
        if base is not None:
            from nextstep.train.config import apply_overrides

            cfg = apply_overrides(base, overrides)
        else:
            cfg = resolve(args.preset, overrides)
        train(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"nextstep: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
