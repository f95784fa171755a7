"""The official NextStep-1 14B shape (Qwen2.5-14B backbone, 1536x12 flow head) at 512px.

smartrun -m configs.nextstep_qwen14b_512px training.max_steps=1000 training.save_steps=200 data.num_workers=2
"""

import sys

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

ARCH_14B = NextStepConfig(
    vocab_size=152064,
    hidden_size=5120,
    intermediate_size=13824,
    num_hidden_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    max_position_embeddings=32768,
    fm_head_dim=1536,
    fm_head_layers=12,
    boi=151667,
    eoi=151668,
    image_placeholder_id=151669,
    pad_token_id_added=151665,
)

# Stage 2: from the released 256px-pretrained NextStep checkpoint, short 512px training.
config = TrainConfig(
    model=ModelConfig(init="pretrained", path="nextstep_models/NextStep-1.1-Pretrain-256px", arch=ARCH_14B),
    data=DataConfig(
        datasets=[DatasetSpec(shards="nextstep_data/pretrain", name="pretrain")], image_size=512, batch_size=4
    ),
    training=TrainingConfig(
        output_dir="runs/nextstep_qwen14b_512px", max_steps=10_000, save_steps=1000, max_seq_len=2048
    ),
    optim=OptimConfig(lr=2e-5, warmup_steps=500),
    parallel=ParallelConfig(activation_checkpointing=True, compile=True),
    logging=LoggingConfig(log_steps=10, sample_steps=1000, sample_size=512, wandb=True),
)

if __name__ == "__main__":
    from nextstep.train.loop import main

    sys.exit(main(sys.argv[1:], base=config))
