"""`vitlens --help` and an argument error against a bare `python -c pass` and `python -c "import torch"`, each a
fresh process (the fastest of interleaved repeats): parsing must not pay for the model stack.

    python bench/cli_help.py
"""
from __future__ import annotations

import subprocess
import sys

import torch

from common import time_interleaved

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "vitlens --help": [sys.executable, "-m", "vitlens.cli", "--help"],
    "vitlens record (bad flag)": [sys.executable, "-m", "vitlens.cli", "record", "tiny-scenes", "scenes", "x",
                                  "--batch-size", "0"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    runs = {name: (lambda cmd=cmd: subprocess.run(cmd, capture_output=True)) for name, cmd in COMMANDS.items()}
    seconds = time_interleaved(runs, torch.device("cpu"), repeats=5)
    base = seconds["python -c pass"]
    print(f"{'command':28s} {'wall s':>8s} {'x bare python':>14s}")
    for name, value in seconds.items():
        print(f"{name:28s} {value:8.3f} {value / base:14.1f}")


if __name__ == "__main__":
    main()
