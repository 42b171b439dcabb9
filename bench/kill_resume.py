"""Kill -9 the recorder at random moments, resume it each time, and compare with an uninterrupted run.

The recorder (``tests/helpers/record_tiny.py``: the tiny test model over synthetic images, slowed down by a
few ms per image so kills land mid-run) runs in a subprocess that gets SIGKILL after a random delay, at
least ``--kills`` times; then one last run finishes the store. The result must equal, bit for bit, a store
recorded in one go, with no shard lost, duplicated or half-written.

    python bench/kill_resume.py [--kills 20] [--images 1200] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from helpers.tiny import SyntheticImages, assert_same_store, record_tiny  # noqa: E402

from vitlens import ActivationStore  # noqa: E402


def recorder(path: Path, images: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "helpers.record_tiny", str(path), "--n", str(images),
                             "--delay", "0.003"], cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="vitlens-kill-"))
    try:
        kill_and_resume(args, rng, root)
    finally:
        shutil.rmtree(root)


def kill_and_resume(args, rng: random.Random, root: Path) -> None:
    """Kill, resume, finish, compare (the stores live under `root`)."""
    reference, path = root / "reference", root / "killed"
    record_tiny(reference, SyntheticImages(args.images), batch_size=4, shard_size=8).close()

    kills, mid_shard, runs = 0, 0, 0
    while kills < args.kills:
        runs += 1
        process = recorder(path, args.images)
        process.stdout.readline()  # "recording": the interpreter is up
        time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.communicate()
        if not (path / "store.json").exists():
            print(f"kill {kills:2d}: before the store existed")
            continue
        partial = list((path / "shards").glob("*.tmp"))
        mid_shard += bool(partial)
        with ActivationStore(path) as store:  # checks every shard on disk
            print(f"kill {kills:2d}: {int(store.done.sum()):5d} of {len(store)} samples in "
                  f"{len(store.shards_on_disk())} complete shards" + (", a shard was half-written" if partial else ""))
        if runs > 4 * args.kills:
            sys.exit("the recording finished before it could be killed often enough; use more --images")

    final = recorder(path, args.images)
    _, err = final.communicate()
    if final.returncode:
        sys.exit(err)
    assert_same_store(path, reference)
    leftovers = list((path / "shards").glob("*.tmp"))
    assert not leftovers, leftovers
    print(f"{kills} kills ({mid_shard} in the middle of a shard), then a resume: the store equals the "
          f"uninterrupted one bit for bit ({args.images} samples, no shard lost, duplicated or half-written)")


if __name__ == "__main__":
    main()
