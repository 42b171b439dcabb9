"""Record the tiny model over synthetic images into a store: the subprocess that the kill and multi-writer
tests (and bench/kill_resume.py) run, kill and resume. Rank and world size come from RANK / WORLD_SIZE.

    python -m helpers.record_tiny PATH [--n 240] [--batch-size 4] [--shard-size 8] [--delay 0.005]
"""
import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from helpers.tiny import SyntheticImages, record_tiny  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--n", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per image load (slows the run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = SyntheticImages(args.n, delay=args.delay)
    print("recording", flush=True)
    record_tiny(args.path, dataset, batch_size=args.batch_size, shard_size=args.shard_size)
    print("done", flush=True)


if __name__ == "__main__":
    main()
