"""~1B NextStep (0.9B decoder + 1536x12 flow head), the benchmark and small-scale research shape, from scratch
on a Qwen2.5 tokenizer at 256px.

    smartrun -m configs.nextstep_1b model.tokenizer_dir=/models/NextStep-1.1 \\
        model.vae_dir=/models/NextStep-1.1/vae
"""

import sys
from dataclasses import replace

from configs.nextstep_qwen14b_256px import ARCH_14B
from nextstep.data.config import DataConfig, DatasetSpec
from nextstep.train.config import (
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainingConfig,
)

# The Qwen2.5 vocabulary and special-token ids of the 14B shape, with a ~1B backbone.
ARCH_1B = replace(
    ARCH_14B,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=20,
    num_attention_heads=16,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
)

config = TrainConfig(
    model=ModelConfig(
        tokenizer_dir="nextstep_models/NextStep-1.1", vae_dir="nextstep_models/NextStep-1.1/vae", arch=ARCH_1B
    ),
    data=DataConfig(
        datasets=[DatasetSpec(shards="nextstep_data/pretrain", name="pretrain")],
        image_size=256,
        batch_size=16,
        num_workers=4,
    ),
    training=TrainingConfig(output_dir="runs/nextstep_1b", max_steps=100_000, save_steps=2000, max_seq_len=1024),
    optim=OptimConfig(lr=3e-4, warmup_steps=2000, weight_decay=0.1),
    parallel=ParallelConfig(compile=True),
    logging=LoggingConfig(log_steps=20, sample_steps=2000),
)

if __name__ == "__main__":
    from nextstep.train.loop import main

    sys.exit(main(sys.argv[1:], base=config))
