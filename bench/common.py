"""Shared timing helpers for the bench scripts: pick the device, time interleaved repeats, print ratios."""
from __future__ import annotations

import time
from typing import Callable

import torch


def device_and_dtype() -> tuple[torch.device, torch.dtype, int]:
    """CUDA with bf16 and a large batch when a GPU is present, else the CPU with fp32 and batch 8."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16, 256
    torch.set_num_threads(1)
    return torch.device("cpu"), torch.float32, 8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                     warmup: int = 1) -> dict[str, float]:
    """Seconds per call of each function: the fastest of `repeats` calls (noise on a shared machine only adds
    time), the calls interleaved so that drift hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


def print_ratio(label: str, value: float, goal: float) -> None:
    verdict = "ok" if value >= goal else "BELOW GOAL"
    print(f"  {label:<60s} {value:6.3f}  (goal >= {goal}, {verdict})")
