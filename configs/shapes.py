"""Stage 1 of the built-in model: a tiny NextStep (~8M parameters in backbone + head) for 128x128 synthetic
shape scenes, 8x8 = 64 image tokens with an 8x VAE and 2x2 patches. Tokenizer and VAE are our own, trained
on the same data first; stage 2 (configs.shapes_stage2) fine-tunes this model with noise on its image
context, and stage 3a (configs.shapes_stage3_attn, shipped) fine-tunes stage 2's attention on captions with
counted-group relations (stages 3 and 4, full fine-tunes, score higher but are not shipped: see their
presets). scripts/train_builtin.sh runs the whole recipe:

    nextstep data synth-shapes data/shapes --n 400000 --seed 0 --workers 16
    nextstep data train-tokenizer data/shapes runs/shapes/tokenizer --vocab-size 1024
    nextstep vae train --data data/shapes --out runs/shapes/vae --ch 64 --ch-mult 1,1,2,2 --num-res-blocks 1
    nextstep data encode-latents data/shapes data/shapes-latents --vae runs/shapes/vae --size 128 --aspect-ratios 1
    nextstep train -m configs.shapes
    nextstep train -m configs.shapes_stage2   (after its export and data, see that preset)
    nextstep train -m configs.shapes_stage3_attn   (likewise)

Training reads the VAE latents precomputed once and compiles the layers: 2.4x the samples/s of PNG shards
with the VAE in the step at this batch, 3.6x at batch 1024 (bench/train_shapes.py, BENCHMARKS.md). Stage 1 of
the shipped model is this preset's 6,564 steps (3.4M samples, 23 minutes on one H100), trained before the
latent shards existed (PNG shards, the same bf16 VAE encode inside the step, no compile). It ran in three
time-limited pieces: the first two with training.max_steps=100000 (still in the constant-lr phase), the
last resumed with the values below, which gives exactly the run this preset describes.
"""

import sys

from nextstep.data.config import DataConfig, DatasetSpec
from nextstep.model.config import NextStepConfig
from nextstep.train.config import (
    CheckpointConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainingConfig,
)

config = TrainConfig(
    model=ModelConfig(
        tokenizer_dir="runs/shapes/tokenizer",
        vae_dir="runs/shapes/vae",
        precomputed_latents=True,
        arch=NextStepConfig(
            # 7.6M parameters: 15 MB in fp16, plus the 8 MB VAE, fits the 25 MB the package may ship.
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            max_position_embeddings=512,
            fm_head_dim=320,
            fm_head_layers=4,
        ),
    ),
    data=DataConfig(
        # Latent shards (nextstep data encode-latents): the step runs no VAE and the loader decodes no PNGs.
        datasets=[DatasetSpec(shards="data/shapes-latents", name="shapes")],
        image_size=128,
        aspect_ratios=(1.0,),
        # The step's host time is nearly fixed: on an H100, 1024 gives 8,200-9,800 samples/s, 512 5,300.
        batch_size=512,
        caption_drop_prob=0.1,
        shuffle_buffer=2000,
        num_workers=14,  # one CPU core each, ~1900 latent samples/s per worker
    ),
    training=TrainingConfig(output_dir="runs/shapes/model", max_steps=6564, save_steps=500, max_seq_len=256),
    # Warm-up, stable, decay: a run cut short by time can be resumed with a larger max_steps, no jump in lr.
    optim=OptimConfig(lr=2e-3, warmup_steps=500, schedule="wsd", decay_steps=2064, weight_decay=0.05),
    # One GPU: nothing is sharded, so layers stay gathered after forward (no second bf16 cast in backward).
    parallel=ParallelConfig(param_dtype="bfloat16", reshard_after_forward=False, compile=True),
    logging=LoggingConfig(log_steps=100, sample_size=128, sample_head_steps=20),
    checkpoint=CheckpointConfig(keep_last=2),
)

if __name__ == "__main__":
    from nextstep.train.loop import main

    sys.exit(main(sys.argv[1:], base=config))
