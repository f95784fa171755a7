"""Flow-based RL post-training (Flow-GRPO style): objective (log-densities, advantages, clipped loss, KL),
rewards (`reward(images, prompts, meta) -> tensor`) and prompts (many phrasings of the shapes scenes)."""
