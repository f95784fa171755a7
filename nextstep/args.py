"""The argument parser of every command: a bad command line is one `PROG: error: ...` line and exit 2, the
format of every other error the commands report (no argparse usage block above it).

    p = ArgumentParser(prog="nextstep export", description="...")
"""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        name = self.prog.split()[0]  # "nextstep" for "nextstep export"; a console script's own name otherwise
        print(f"{name}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
