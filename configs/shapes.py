"""Tiny NextStep for the procedural shapes data (~10M parameters in backbone + head), 128x128 images =
8x8 = 64 image tokens with the 8x VAE and 2x2 patches; vocabulary and special ids from the tokenizer dir.

    nextstep data synth-shapes data/shapes --n 200000
    nextstep train -m configs.shapes training.max_steps=1000 training.save_steps=200 data.num_workers=2
"""

import sys
from pathlib import Path

from nextstep.data.wds import DataConfig, DatasetSpec
from nextstep.model.config import NextStepConfig
from nextstep.train.config import (
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainingConfig,
)

TINY = Path(__file__).resolve().parents[1].parent / "shared/reference/nextstep11-tiny"

config = TrainConfig(
    model=ModelConfig(
        tokenizer_dir=str(TINY),  # any NextStep tokenizer dir; vocab_size is read from it
        vae_dir=str(TINY / "vae"),  # an 8x, 16-channel VAE in the official layout
        arch=NextStepConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            fm_head_dim=384,
            fm_head_layers=4,
        ),
    ),
    data=DataConfig(
        datasets=[DatasetSpec(shards="data/shapes", name="shapes")],
        image_size=128,
        aspect_ratios=(1.0,),
        batch_size=64,
        num_workers=4,
    ),
    training=TrainingConfig(output_dir="runs/shapes", max_steps=20_000, save_steps=1000, max_seq_len=256),
    optim=OptimConfig(lr=5e-4, warmup_steps=500),
    parallel=ParallelConfig(param_dtype="bfloat16"),
    logging=LoggingConfig(log_steps=20, sample_steps=1000, sample_size=128, sample_head_steps=20),
)

if __name__ == "__main__":
    from nextstep.train.loop import main

    sys.exit(main(sys.argv[1:], base=config))
