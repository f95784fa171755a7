"""Profiling a window of training steps with torch.profiler (`logging.profile_steps`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nextstep.io import write_text

log = logging.getLogger(__name__)


class StepProfiler:
    """torch.profiler over training steps [start, start + steps): writes a Chrome trace and the top
    operators by self time to `out_dir`, and logs the table. `steps=0` does nothing."""

    def __init__(self, out_dir: Path, *, start: int, steps: int, enabled: bool) -> None:
        self.out_dir, self.start, self.stop = out_dir, start, start + steps
        self.active = enabled and steps > 0
        self.prof: torch.profiler.profile | None = None

    def step(self, step: int) -> None:
        """Call after each finished step with the new step count."""
        if not self.active:
            return
        if step == self.start and self.prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
        elif step == self.stop:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        averages = self.prof.key_averages()
        tables = [averages.table(sort_by="self_cpu_time_total", row_limit=25)]
        if torch.cuda.is_available():
            tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=25))
        table = "\n".join(tables)
        write_text(self.out_dir / "ops.txt", table)
        log.info("profile of steps %d-%d (%s):\n%s", self.start, self.stop, self.out_dir, table)
        self.prof, self.active = None, False
