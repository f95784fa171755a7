"""`smartrun` / `nextstep launch`: run a training preset under torchrun on every GPU of this node, and
across nodes when MASTER_ADDR / MASTER_PORT / NNODES / NODE_RANK are set.

    nextstep launch -m configs.nextstep_qwen14b_512px training.max_steps=1000 --dry-run
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from nextstep.args import ArgumentParser


def count_gpus() -> int:
    """GPUs this node may use (CUDA_VISIBLE_DEVICES respected); 0 without CUDA."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def build_command(
    module: str,
    overrides: list[str],
    *,
    nproc_per_node: int,
    env: dict[str, str],
) -> list[str]:
    """The torchrun command line: single-node standalone rendezvous, or the static multi-node one."""
    nnodes = int(env.get("NNODES", env.get("WORLD_SIZE_NODES", "1")))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if nnodes > 1:
        for name in ("MASTER_ADDR", "NODE_RANK"):
            if name not in env:
                raise ValueError(f"NNODES={nnodes} needs {name} in the environment")
        cmd += [
            f"--nnodes={nnodes}",
            f"--node_rank={env['NODE_RANK']}",
            f"--master_addr={env['MASTER_ADDR']}",
            f"--master_port={env.get('MASTER_PORT', '29500')}",
        ]
    else:
        cmd += ["--nnodes=1", "--node_rank=0", "--standalone"]
    return cmd + ["-m", module, *overrides]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="smartrun", description="torchrun a training preset on all GPUs")
    parser.add_argument("-m", "--module", required=True, help="preset module, e.g. configs.shapes")
    parser.add_argument("--nproc-per-node", type=int, default=0, help="processes per node (0: one per GPU)")
    parser.add_argument("--dry-run", action="store_true", help="print the command without running it")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides passed to the preset")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    nproc = args.nproc_per_node or max(1, count_gpus())
    overrides = args.overrides + (["--resume"] if args.resume else [])
    try:
        cmd = build_command(args.module, overrides, nproc_per_node=nproc, env=dict(os.environ))
    except ValueError as e:
        print(f"nextstep: error: {e}", file=sys.stderr)
        return 2
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd)
