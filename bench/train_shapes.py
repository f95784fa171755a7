"""Training throughput of the built-in model's preset (configs.shapes): image shards with the VAE encode in
the step (the baseline, the preset before latent shards) against latent shards with compiled layers.

    nextstep data synth-shapes data/shapes --n 20000 --workers 16
    nextstep data encode-latents data/shapes data/shapes-latents --vae nextstep/assets/nextstep-shapes/vae --size 128
    python3 bench/train_shapes.py --images data/shapes --latents data/shapes-latents --steps 150

Each configuration is a real `nextstep train -m configs.shapes` run from the shipped weights; the number is
the median steps/s of its logged windows after the first (compile, loader start) times the batch size.
One JSON line per result: {"what", "config", "device", "number", "unit"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MODEL = Path(__file__).resolve().parents[1] / "nextstep/assets/nextstep-shapes"


def run(name: str, overrides: list[str], *, steps: int, log_steps: int, out: Path) -> float:
    """Median steps/s over the logged windows after the first."""
    cmd = [sys.executable, "-m", "nextstep.cli", "train", "-m", "configs.shapes", "model.init=pretrained",
           f"model.path={MODEL}", f"model.tokenizer_dir={MODEL}", f"model.vae_dir={MODEL / 'vae'}",
           f"training.max_steps={steps}", "training.save_steps=0", f"logging.log_steps={log_steps}",
           "logging.progress=false", f"training.output_dir={out / name}", *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["steps_per_s"] for r in rows[1:] or rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="PNG shards (nextstep data synth-shapes)")
    p.add_argument("--latents", required=True, help="their latent shards (nextstep data encode-latents)")
    p.add_argument("--steps", type=int, default=150, help="steps per configuration")
    p.add_argument("--log-steps", type=int, default=25, help="steps per timed window")
    p.add_argument("--batch", type=int, default=512, help="baseline batch (the preset's)")
    p.add_argument("--latent-batches", default="512,1024", help="batches tried with latents + compile")
    p.add_argument("--workers", type=int, default=14, help="loader workers")
    args = p.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    compile_ = "true" if torch.cuda.is_available() else "false"  # CPU inductor cannot build the bf16 step
    data = [f"data.num_workers={args.workers}"]

    def images(path: str) -> str:
        return f'data.datasets=[{{"shards": "{path}", "name": "shapes"}}]'

    def emit(config: dict, steps_per_s: float, batch: int) -> float:
        number = steps_per_s * batch
        print(json.dumps({"what": "configs.shapes training", "config": config, "device": device,
                          "number": round(number, 1), "unit": "samples/s"}), flush=True)  # fmt: skip
        return number

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        base_cfg = {"data": "png shards", "vae": "in step", "compile": False, "batch": args.batch}
        rate = run("base", [images(args.images), "model.precomputed_latents=false", "parallel.compile=false",
                            f"data.batch_size={args.batch}", *data], steps=args.steps, log_steps=args.log_steps,
                   out=out)  # fmt: skip
        base = emit(base_cfg, rate, args.batch)
        for batch in (int(b) for b in args.latent_batches.split(",")):
            cfg = {"data": "latent shards", "vae": "precomputed", "compile": compile_ == "true", "batch": batch}
            rate = run(f"latents{batch}", [images(args.latents), "model.precomputed_latents=true",
                                           f"parallel.compile={compile_}", f"data.batch_size={batch}", *data],
                       steps=args.steps, log_steps=args.log_steps, out=out)  # fmt: skip
            number = emit(cfg, rate, batch)
            print(json.dumps({"what": "speedup over the baseline", "config": cfg, "device": device,
                              "number": round(number / base, 2), "unit": "x"}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
