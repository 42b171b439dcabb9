"""Four writers on one store, SIGKILLed at random moments and restarted, then a resume; compare with an
uninterrupted run.

The recorder (``tests/helpers/record_tiny.py``: the tiny test model over synthetic images, slowed down by a
few ms per image so kills land mid-run) runs in ``--writers`` concurrent subprocesses; after a random delay
one of them gets SIGKILL and a new writer takes its place, until ``--kills`` kills; then the writers finish
and one last run resumes. The store must equal, bit for bit, one recorded in one go, with no shard lost,
half-written or computed twice by live writers (checked in ``writes.log``).

    python bench/kill_resume.py [--kills 20] [--writers 4] [--images 1200] [--delay 0.01] [--seed 0]
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
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from helpers.tiny import SyntheticImages, assert_same_store, check_log, record_tiny, write_log  # noqa: E402

from vitlens import ActivationStore  # noqa: E402


def recorder(path: Path, images: int, delay: float) -> subprocess.Popen:
    """A writer subprocess; ``process.ready`` is set once its interpreter is up and it starts recording."""
    process = subprocess.Popen([sys.executable, "-m", "helpers.record_tiny", str(path), "--n", str(images),
                                "--delay", str(delay)], cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    process.ready = threading.Event()
    threading.Thread(target=lambda: process.stdout.readline() and process.ready.set(), daemon=True).start()
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.01, help="seconds per image load (slows the writers)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="vitlens-kill-"))
    try:
        kill_and_resume(args, rng, root)
    finally:
        shutil.rmtree(root)


def kill_and_resume(args, rng: random.Random, root: Path) -> None:
    """Kill, restart, finish, resume, compare (the stores live under `root`)."""
    reference, path = root / "reference", root / "killed"
    record_tiny(reference, SyntheticImages(args.images), batch_size=4, shard_size=8).close()
    started = time.perf_counter()
    writers = [recorder(path, args.images, args.delay) for _ in range(args.writers)]
    killed: set[int] = set()
    while len(killed) < args.kills:
        time.sleep(rng.uniform(0.0, 1.0))
        if all(w.poll() is not None for w in writers):
            sys.exit(f"the recording finished after {len(killed)} kills; use more --images")
        ready = [w for w in writers if w.poll() is None and w.ready.is_set()]  # kills land in the recording
        if not ready:
            continue
        victim = rng.choice(ready)
        victim.send_signal(signal.SIGKILL)
        victim.communicate()
        killed.add(victim.pid)
        writers.remove(victim)
        writers.append(recorder(path, args.images, args.delay))
        if not (path / "store.json").exists():
            print(f"kill {len(killed):2d}: before the store existed")
            continue
        with ActivationStore(path) as store:
            print(f"kill {len(killed):2d}: {int(store.done.sum()):5d} of {len(store)} samples published")
    for writer in writers:
        _, err = writer.communicate()
        if writer.returncode:
            sys.exit(err)
    final = recorder(path, args.images, 0.0)
    _, err = final.communicate()
    if final.returncode:
        sys.exit(err)
    seconds = time.perf_counter() - started
    assert_same_store(path, reference)
    check_log(path, killed)
    leftovers = [p for p in (path / "shards").iterdir() if p.suffix != ".h5"]
    assert not leftovers, leftovers
    takeovers = sum(e["event"] == "takeover" for e in write_log(path))
    print(f"{len(killed)} kills among {args.writers} writers ({takeovers} claims of killed writers taken over), "
          f"then a resume, in {seconds:.0f} s: the store equals the uninterrupted one bit for bit "
          f"({args.images} samples; no shard lost, half-written or computed twice by live writers)")


if __name__ == "__main__":
    main()
