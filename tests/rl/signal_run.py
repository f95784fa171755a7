"""A CPU RL run (the tiny reference, shapes prompts and reward, 16 images a step scored by a 2-worker reward pool)
that sends SIGINT to its whole process group while the pool scores step 2, as `timeout --signal=INT` does. Run by
tests/rl/test_rl_loop.py, in a process group of its own, with SIGNAL_RUN_DIR set:

    SIGNAL_RUN_DIR=OUT python -m tests.rl.signal_run [--resume]
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from nextstep.rl import rewards
from nextstep.train import loop
from nextstep.train.config import apply_overrides
from tests.rl.test_rl_loop import rl_cfg

OUT = Path(os.environ["SIGNAL_RUN_DIR"])
_score = rewards._score


def score_and_signal(image, meta) -> dict:
    """The pool's task (workers import this module): once armed, every worker waits until both are inside a task,
    then one sends SIGINT to the group, so the signal reaches workers busy scoring."""
    if (OUT / "armed").exists() and not (OUT / "fired").exists():
        (OUT / f"busy-{os.getpid()}").touch()
        deadline = time.monotonic() + 60
        while len(list(OUT.glob("busy-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            os.close(os.open(OUT / "fired", os.O_CREAT | os.O_EXCL))
            os.killpg(0, signal.SIGINT)
        except FileExistsError:
            pass
        time.sleep(0.5)  # a worker that does not ignore SIGINT raises KeyboardInterrupt here
    return _score(image, meta)


def main(resume: bool) -> None:
    rewards.POOL_MIN, rewards._workers, rewards._score = 16, lambda: 2, score_and_signal
    scores, calls = rewards._scores, []

    def arm_at_step_2(images, meta):
        calls.append(len(images))
        if len(calls) == 2 and not resume:
            (OUT / "armed").touch()
        return scores(images, meta)

    rewards._scores = arm_at_step_2
    cfg = rl_cfg(OUT / "run", prompts="shapes", reward="shapes")
    cfg = apply_overrides(cfg, ["training.max_steps=4", f"training.resume={str(resume).lower()}"])
    history = loop.train(cfg)
    (OUT / f"history{'-resumed' if resume else ''}.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main("--resume" in sys.argv[1:])
