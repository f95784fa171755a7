"""The official NextStep-1 14B shape (Qwen2.5-14B backbone, 1536x12 flow head) at 512px.

smartrun -m configs.nextstep_qwen14b_512px training.max_steps=1000 training.save_steps=200 data.num_workers=2
"""

import sys

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
