"""What every ``modse-*`` command shares: one-line errors with exit code 2 (torch-free)."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def fail(prog: str, message: str) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` as one line and exit with code 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but errors are one line (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see {self.prog} --help)")
