"""configs.rl_nextstep11_14b at the ~1B shape (configs.nextstep_1b) on one GPU: the same RL step, to check the
14B recipe's code, memory and throughput before a multi-GPU run. From an exported 1B checkpoint:

    nextstep train -m configs.rl_nextstep11_1b model.path=runs/nextstep_1b/final rl.reward=brightness \\
        rl.prompts=file:prompts/rl.txt

Peak memory on one H200 (the 14B preset's arithmetic at 0.9B + 0.1B head): ~4 GB masters, 4 GB gathered state,
2 GB rollout copy, 0.9 GB KV cache for 16 images of 512 px, ~0.3 GB activations per image.
"""

import sys
from dataclasses import replace

from configs.nextstep_1b import ARCH_1B
from configs.rl_nextstep11_14b import config as rl_14b

config = replace(
    rl_14b,
    model=replace(rl_14b.model, path="runs/nextstep_1b/final", arch=ARCH_1B),
    training=replace(rl_14b.training, output_dir="runs/rl_nextstep11_1b"),
    parallel=replace(rl_14b.parallel, activation_checkpointing=False),
    logging=replace(rl_14b.logging, wandb=False),
)

if __name__ == "__main__":
    from nextstep.train.loop import main

    sys.exit(main(sys.argv[1:], base=config))
