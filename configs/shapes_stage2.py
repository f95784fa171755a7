"""Second stage of the built-in model: configs.shapes' model, fine-tuned with noise on the image tokens it
reads (training.image_input_noise=1.0: each image's std uniform in [0, 1], the latents having unit std).

Stage 1 learns to copy its image context so exactly that its loss nearly doubles when that context carries
noise of std 0.1, and what it samples drifts off the data: it scored 0.08 on `nextstep eval shapes`. With
noisy context the next token has to come from the text; this stage took the model to 0.86 in-distribution
and 0.83 held-out (n=50, BENCHMARKS.md; 0.82 / 0.81 before the scorer's hexagon fix); it was the shipped
model until stage 3a (configs.shapes_stage3_attn), which trains its attention on. Stage 3
(configs.shapes_stage3) trains all of it on with twice the noise. scripts/train_builtin.sh runs it after
stage 1:

    nextstep export runs/shapes/model runs/shapes/stage1 --dtype float16
    nextstep data synth-shapes data/shapes-ft --n 200000 --seed 1 --workers 16
    nextstep data encode-latents data/shapes-ft data/shapes-ft-latents --vae runs/shapes/vae --size 128 \
        --aspect-ratios 1
    nextstep train -m configs.shapes_stage2

The model shipped before stage 3a is this preset's 7,359 steps of 1024 samples (7.5M samples; on one H200,
sharing it with a second run, 6.7-6.9 steps/s), resumed twice; the first two pieces ran with
training.max_steps=100000.
"""

import sys
from dataclasses import replace

from configs.shapes import config as stage1
from nextstep.data.config import DatasetSpec

config = replace(
    stage1,
    # Stage 1's fp16 export (what shipped before this stage existed); fresh AdamW state.
    model=replace(stage1.model, init="pretrained", path="runs/shapes/stage1"),
    # 200k fresh scenes (seed 1); 6 loader workers (the data order depends on the worker count).
    data=replace(
        stage1.data,
        datasets=[DatasetSpec(shards="data/shapes-ft-latents", name="shapes")],
        batch_size=1024,
        num_workers=6,
    ),
    training=replace(
        stage1.training, output_dir="runs/shapes/model-stage2", max_steps=7359, save_steps=1000, image_input_noise=1.0
    ),
    optim=replace(stage1.optim, warmup_steps=200, decay_steps=2359),
)

if __name__ == "__main__":
    from nextstep.train.loop import main

    sys.exit(main(sys.argv[1:], base=config))
