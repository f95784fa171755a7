"""`singlegpu_debug` / `multigpu_debug`: run training, or any `nextstep` command, under debugpy so that VS Code
(or any DAP client) can attach; each process listens on --port + its local rank.

    singlegpu_debug -m configs.debug training.max_steps=5
    singlegpu_debug --wait -- generate "a red circle" -o out.png
    multigpu_debug --nproc-per-node 2 -m configs.debug training.max_steps=5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

from nextstep.args import ArgumentParser


def build_parser(prog: str, *, multi: bool) -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=f"`{prog} [options] -- COMMAND ...` runs `nextstep COMMAND ...` instead of training",
    )
    p.add_argument("-m", "--module", help="training preset, e.g. configs.debug (same as `nextstep train -m`)")
    p.add_argument("--port", type=int, default=5678, help="port of rank 0; rank r listens on port + r")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: reachable from other hosts)")
    p.add_argument("--wait", action="store_true", help="wait for a client before running (each rank waits)")
    if multi:
        p.add_argument("--nproc-per-node", type=int, default=0, help="processes (0: one per GPU)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the preset, e.g. training.max_steps=5")
    return p


def parse(argv: list[str], prog: str, *, multi: bool) -> tuple[argparse.Namespace, list[str]]:
    """The options and the `nextstep` command to run: `train -m MODULE overrides`, or what follows `--`."""
    p = build_parser(prog, multi=multi)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    if split < len(argv):
        if args.module or args.overrides:
            p.error("give either -m MODULE [overrides] or -- COMMAND ..., not both")
        if split + 1 == len(argv):
            p.error("nothing after --: give a nextstep command, e.g. -- config show debug")
        return args, argv[split + 1 :]
    if not args.module:
        p.error("give a training preset with -m configs.NAME, or a command after --")
    return args, ["train", "-m", args.module, *args.overrides]


def display_host(host: str) -> str:
    return socket.gethostname() if host in ("0.0.0.0", "::") else host


def launch_json(host: str, ports: list[int]) -> str:
    """A VS Code .vscode/launch.json attaching to each port (one configuration per rank)."""
    configs = [
        {
            "name": f"nextstep rank {i}",
            "type": "debugpy",
            "request": "attach",
            "connect": {"host": display_host(host), "port": port},
            "pathMappings": [{"localRoot": "${workspaceFolder}", "remoteRoot": os.getcwd()}],
            "justMyCode": False,
        }
        for i, port in enumerate(ports)
    ]
    return json.dumps({"version": "0.2.0", "configurations": configs}, indent=2)


def listen(host: str, port: int, *, wait: bool) -> None:
    """Start debugpy in this process on host:port (+ LOCAL_RANK under torchrun); optionally wait for a client."""
    try:
        import debugpy
    except ImportError:
        raise ValueError("debugpy is not installed: pip install 'nextstep[debug]' (or pip install debugpy)") from None
    rank = int(os.environ.get("LOCAL_RANK", 0))
    port += rank
    try:
        debugpy.listen((host, port))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e}") from None
    state = "waiting for a client" if wait else "running, attach any time"
    say(f"debug: rank {rank} listening on {display_host(host)}:{port} ({state})")
    if wait:
        debugpy.wait_for_client()
        say(f"debug: rank {rank} client attached")


def say(line: str) -> None:
    """One line on stderr in one write: print() writes the text and its newline separately (stderr writes
    through), so the ranks' lines could run into one another in a shared log."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main_single(argv: list[str] | None = None, *, prog: str = "singlegpu_debug") -> int:
    """One process (also each worker that multigpu_debug starts through torchrun)."""
    args, command = parse(sys.argv[1:] if argv is None else argv, prog, multi=False)
    try:
        if "LOCAL_RANK" not in os.environ:
            print(f"debug: VS Code launch.json:\n{launch_json(args.host, [args.port])}", file=sys.stderr)
        listen(args.host, args.port, wait=args.wait)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    from nextstep.cli import main as nextstep_main

    return nextstep_main(command)


def main_multi(argv: list[str] | None = None) -> int:
    """torchrun this module on every GPU of the node (nextstep.train.launch); each rank listens on port + rank."""
    from nextstep.train.launch import build_command, count_gpus

    args, command = parse(sys.argv[1:] if argv is None else argv, "multigpu_debug", multi=True)
    nproc = args.nproc_per_node or max(1, count_gpus())
    ports = [args.port + r for r in range(nproc)]
    print(f"debug: VS Code launch.json:\n{launch_json(args.host, ports)}", file=sys.stderr, flush=True)
    worker = ["--host", args.host, "--port", str(args.port), *(["--wait"] if args.wait else []), "--", *command]
    try:
        cmd = build_command("nextstep.debug", worker, nproc_per_node=nproc, env=dict(os.environ))
    except ValueError as e:
        print(f"multigpu_debug: error: {e}", file=sys.stderr)
        return 2
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main_single())
