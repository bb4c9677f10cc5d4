"""Rows of examples: best-fit-decreasing bins, packed rows with per-example positions, and unpacked
rows with theirs."""

from __future__ import annotations

import bisect

from tasks.data.batching import IGNORE


def bins(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit-decreasing: indices grouped into rows of at most max_len tokens, each example
    going to the fullest row that still has room for it (a sorted list of free space)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            groups.append([i])
            bisect.insort(free, (max_len - n, len(groups) - 1))
        else:
            room, row = free.pop(k)
            groups[row].append(i)
            bisect.insort(free, (room - n, row))
    return groups


def pack(table, max_len: int):
    """Pack a pyarrow table of examples (input_ids, labels, length) into rows of <= max_len.

    Positions restart per example, and with no attention mask the model builds a
    block-diagonal causal mask from them (transformers' packed-sequence detection on
    sdpa/eager, varlen kernels on flash-attention): no token attends across examples.
    """
    import numpy as np
    import pyarrow as pa

    lengths = table.column("length").to_numpy()
    groups = bins(lengths.tolist(), max_len)
    order = np.fromiter((i for g in groups for i in g), dtype=np.int64, count=len(lengths))
    taken = table.select(["input_ids", "labels"]).take(pa.array(order))
    ids = taken.column("input_ids").combine_chunks().flatten()
    labels = taken.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False).copy()
    ex_len = lengths[order]
    ex_start = np.concatenate([[0], np.cumsum(ex_len)[:-1]])
    labels[ex_start] = IGNORE  # the first token of an example is never a target of the previous one
    positions = (np.arange(int(ex_len.sum())) - np.repeat(ex_start, ex_len)).astype(np.int32)
    row_len = np.fromiter((int(lengths[g].sum()) for g in groups), dtype=np.int64, count=len(groups))
    offsets = pa.array(np.concatenate([[0], np.cumsum(row_len)]).astype(np.int32))
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, ids),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
            "position_ids": pa.ListArray.from_arrays(offsets, pa.array(positions)),
            "length": pa.array(row_len.astype(np.int32)),
        }
    )


def with_positions(batch):
    """Unpacked rows: positions 0..n-1 per example."""
    import numpy as np
    import pyarrow as pa

    ids = batch.column("input_ids").combine_chunks()
    lengths = batch.column("length").to_numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    positions = (np.arange(int(lengths.sum())) - np.repeat(starts, lengths)).astype(np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table(
        {
            "input_ids": ids,
            "labels": batch.column("labels").combine_chunks(),
            "position_ids": pa.ListArray.from_arrays(offsets, pa.array(positions)),
            "length": pa.array(lengths.astype(np.int32)),
        }
    )
