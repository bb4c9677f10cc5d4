"""How many CPU threads a rank's torch uses: its share of the cores, as torchrun's rule gives.

Each rank's torch otherwise starts one OpenMP thread per core. With two ranks on two cores (or
any other busy process beside a rank), every parallel op then waits for a thread whose core is
taken: a tiny model's steps ran about 50x slower. ``OMP_NUM_THREADS`` set by the user wins.
"""

from __future__ import annotations

import os


def rank_threads(local_ranks: int) -> int:
    """Sets and returns this rank's thread count: its share of the cores it may run on."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, local_ranks))
    torch.set_num_threads(threads)
    return threads
