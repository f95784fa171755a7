"""Third stage of the built-in model, not shipped: stage 2's model, trained on with twice the
image-input noise (training.image_input_noise=2.0: each image's std uniform in [0, 2]) on 300k fresh scenes.

Stage 2 (noise 1.0) still repeated its context too readily: two-object prompts often came out as two of the
first shape, and counts were off. Noise 2.0 took the model from 0.857 to 0.920 in-distribution and from
0.831 to 0.931 held-out (`nextstep eval shapes --n 50`, BENCHMARKS.md); the same steps with noise 1.0 gained
less (0.857 against 0.890 at n=30 on a tuning set). It still gets the README's first prompt (a counted
group in a relation) wrong in most samples (2 of 16); stage 4 (configs.shapes_stage4) trains it on captions
that have such groups. A full fine-tune adds 14 MB to the git history, so the shipped model is the
attention-only stage 3a (configs.shapes_stage3_attn) instead.
`STAGES=3 bash scripts/train_builtin.sh` runs it after stage 2:

    nextstep export runs/shapes/model-stage2 runs/shapes/stage2 --dtype float16
    nextstep data synth-shapes data/shapes-ft2 --n 300000 --seed 2 --workers 16
    nextstep data encode-latents data/shapes-ft2 data/shapes-ft2-latents --vae runs/shapes/vae --size 128 \
        --aspect-ratios 1
    nextstep train -m configs.shapes_stage3

The measured candidate is this preset's 8,369 steps of 1024 samples (8.6M samples; on one H200, sharing it
with a second run, 6.7-6.9 steps/s), in three time-limited pieces: the first two with
training.max_steps=100000 (still in the constant-lr phase), the last resumed with the values below.
"""

import sys
from dataclasses import replace

from configs.shapes_stage2 import config as stage2
from nextstep.data.config import DatasetSpec

config = replace(
    stage2,
    # Stage 2's fp16 export; fresh AdamW state.
    model=replace(stage2.model, path="runs/shapes/stage2"),
    data=replace(stage2.data, datasets=[DatasetSpec(shards="data/shapes-ft2-latents", name="shapes")]),
    training=replace(
        stage2.training, output_dir="runs/shapes/model-stage3", max_steps=8369, save_steps=500, image_input_noise=2.0
    ),
    optim=replace(stage2.optim, decay_steps=3056),
)

if __name__ == "__main__":
    from nextstep.train.loop import main

    sys.exit(main(sys.argv[1:], base=config))
