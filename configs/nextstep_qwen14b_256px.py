"""The official NextStep-1 14B shape (Qwen2.5-14B backbone, 1536x12 flow head) at 256px.

smartrun -m configs.nextstep_qwen14b_256px training.max_steps=1000 training.save_steps=200 data.num_workers=2
"""

import sys

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

# Stage 1: from the Qwen2.5-14B LM (backbone from the LM, image modules fresh), long 256px pre-training.
config = TrainConfig(
    model=ModelConfig(
        init="lm",
        path="nextstep_models/Qwen2.5-14B",
        tokenizer_dir="nextstep_models/NextStep-1.1-Pretrain",  # has the image special tokens
        vae_dir="nextstep_models/NextStep-1.1-Pretrain/vae",
        vocab_multiple=0,  # keep the LM's padded 152064 rows
        arch=ARCH_14B,
    ),
    data=DataConfig(
        datasets=[DatasetSpec(shards="nextstep_data/pretrain", name="pretrain")], image_size=256, batch_size=8
    ),
    training=TrainingConfig(
        output_dir="runs/nextstep_qwen14b_256px", max_steps=500_000, save_steps=2000, max_seq_len=1024
    ),
    optim=OptimConfig(lr=1e-4, warmup_steps=2000, module_lr={"image_head": 10.0}),
    parallel=ParallelConfig(activation_checkpointing=True, compile=True),
    logging=LoggingConfig(log_steps=10, sample_steps=5000, wandb=True),
)

if __name__ == "__main__":
    from nextstep.train.loop import main

    sys.exit(main(sys.argv[1:], base=config))
