"""How many CPU threads a rank's torch uses: its share of the cores, as torchrun's rule gives.

Each rank's torch otherwise starts one OpenMP thread per core, and every parallel op waits for
a thread whose core another process holds: two ranks of a tiny model on two cores took 7.6x as
long, and one rank beside a busy process 56x. ``OMP_NUM_THREADS``, when set, wins.
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
