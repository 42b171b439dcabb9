"""Shared fixtures. Tests run offline on the CPU with one torch thread (see README)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """`vitlens demo` at a small size in a fresh folder: (report path, per-step table, cold seconds)."""
    import time

    from analyses.demo import run_demo

    start = time.perf_counter()
    report, steps = run_demo(tmp_path_factory.mktemp("demo") / "demo", n_per_class=11, bench_per_class=2,
                             diffmask_steps=6, progress=False)
    return report, steps, time.perf_counter() - start
