"""Tiny CPU run for smoke tests: 2-layer, 64-wide model, the tiny reference tokenizer and VAE.

nextstep train -m configs.debug data.datasets='[{"shards": "data/debug"}]'
"""

import sys
from pathlib import Path

from nextstep.data.config import DataConfig, DatasetSpec
from nextstep.model.config import NextStepConfig
from nextstep.train.config import (
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainingConfig,
)

# The NextStep-1.1 reference the tests ship (tests/reference), so the preset runs in a fresh clone.
TINY = Path(__file__).resolve().parents[1] / "tests" / "reference" / "nextstep11-tiny"

config = TrainConfig(
    model=ModelConfig(
        tokenizer_dir=str(TINY),
        vae_dir=str(TINY / "vae"),
        arch=NextStepConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, fm_head_dim=64),
    ),
    data=DataConfig(
        datasets=[DatasetSpec(shards="data/debug", name="debug")],
        image_size=64,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=16,
    ),
    training=TrainingConfig(output_dir="runs/debug", max_steps=20, save_steps=10, max_seq_len=256),
    optim=OptimConfig(lr=1e-3, warmup_steps=2),
    parallel=ParallelConfig(param_dtype="float32"),
    logging=LoggingConfig(log_steps=1, sample_size=64, sample_head_steps=4),
)

if __name__ == "__main__":
    from nextstep.train.loop import main

    sys.exit(main(sys.argv[1:], base=config))
