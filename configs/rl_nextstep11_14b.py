"""RL post-training of NextStep-1.1-Pretrain (14B) as NextStep-1.1 was: Flow-GRPO on the flow head's SDE steps,
512 px, no guidance in the rollouts, on 8+ H200s with FSDP2, LoRA on the backbone and the image path trained fully.
The reward is a CLIP-family preference model from a local directory (nothing is downloaded).

    torchrun --nproc_per_node=8 -m configs.rl_nextstep11_14b rl.reward_model_dir=/models/PickScore_v1 \\
        rl.prompts=file:prompts/rl.txt

Shape and memory per GPU on paper (8 GPUs, bf16 compute, fp32 masters; 512 px = 32 x 32 = 1024 image tokens,
~1,130 tokens with the prompt; G=8 images x 2 prompts = 16 rollouts per GPU, 2 trained head steps per token):
- Parameters: 14.8B backbone (Qwen2.5-14B: 48 layers of 5120, 13824 MLP, 40/8 heads, 1.56B in embed + lm_head),
  0.16B flow head (1536 x 12 adaLN blocks), 26M projectors: 15.0B. Stored fp32 and sharded: 60 GB / 8 = 7.5 GB.
- LoRA r=64 on every decoder linear: 5.7M per layer, 0.27B; with the image path (0.19B) 0.46B trainable:
  masters, grads and AdamW moments 16 B each = 7.4 GB / 8 = 0.9 GB. (Full fine-tuning: 16 B x 15.0B = 240 GB,
  30 GB per GPU on 8; set lora.enabled=false on 16 GPUs or more.)
- Rollout copy (nextstep.train.metrics.sampling_copy, every rank): the full state is gathered on the device in
  fp32 (60 GB, transient) into a bf16 copy with adapters merged (30 GB), freed after the rollouts: peak ~98 GB.
- Rollout KV cache: 48 layers x 2 (K, V) x 8 heads x 128 x 2 B = 196 KB per token; 1,280 slots (kv_block 256)
  x 16 images = 4.0 GB. Head state is negligible.
- Teacher-forced forward and backward with activation checkpointing: 48 layer inputs of 1,130 x 5120 bf16 =
  0.56 GB per image, one recomputed layer ~0.15 GB, the head at 1024 x 2 states x 12 blocks ~0.45 GB: ~1.2 GB
  per image, 19 GB for the 16 rollouts of one GPU.
Peak ~100 GB during the copy, ~35 GB during the update, of 141 GB: it fits, with room for G=16. Check on one GPU
with configs.rl_nextstep11_1b first (same code, 1B shape).
"""

import sys

from configs.nextstep_qwen14b_256px import ARCH_14B
from nextstep.train.config import (
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RLConfig,
    TrainConfig,
    TrainingConfig,
)

config = TrainConfig(
    model=ModelConfig(init="pretrained", path="nextstep_models/NextStep-1.1-Pretrain", arch=ARCH_14B),
    training=TrainingConfig(mode="rl", output_dir="runs/rl_nextstep11_14b", max_steps=1000, save_steps=50),
    optim=OptimConfig(lr=1e-4, warmup_steps=10, schedule="constant", weight_decay=0.0),  # Flow-GRPO's LoRA lr
    parallel=ParallelConfig(activation_checkpointing=True),
    lora=LoraConfig(enabled=True, rank=64, alpha=128.0),
    logging=LoggingConfig(log_steps=1, sample_steps=50, sample_size=512, wandb=True),
    rl=RLConfig(
        group_size=8,
        prompts_per_step=2,
        prompts="file:prompts/rl.txt",
        reward="clip_preference",
        image_size=512,
        head_steps=28,  # the NextStep-1.1 default
        shift=1.0,
        rule="sde",
        noise_level=0.8,
        train_steps=list(range(14)),
        steps_per_rollout=2,
        clip=0.2,
        kl_weight=0.04,
        rollout_states=0,  # the copy and its KV cache are freed before each update: the peaks above
    ),
)

if __name__ == "__main__":
    from nextstep.train.loop import main

    sys.exit(main(sys.argv[1:], base=config))
