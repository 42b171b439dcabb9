"""Shared fixtures. Tests run offline on the CPU with one torch thread (see README)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
