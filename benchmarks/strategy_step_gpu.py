"""``strategy_step`` on GPUs: DDP, unverified and verified BTARD with NCCL, one process per GPU, in one run.

    ./run bench strategy_step_gpu [--world N] [--models ...]

Skipped (exit 0, with a message) on a machine without CUDA GPUs, such as the one this project is developed on: it
has never run there. With fewer GPUs than ``--world``, it uses every GPU there is (at least 2).
"""

from __future__ import annotations

import sys

import torch
from strategy_step import main

if __name__ == "__main__":
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        print(f"strategy_step_gpu: skipped, {gpus} CUDA GPU(s) here (it needs 2 or more)")
        sys.exit(0)
    argv = sys.argv[1:]
    if "--world" not in argv:
        argv += ["--world", str(min(4, gpus))]
    main(argv, accelerator="gpu")
