"""How a training step's stored rows meet the ranks: the one rule the trainer and the launcher check.

W ranks in all (every GPU of every node), N of them share each pack (--sequence_parallel_size),
DP = W / N train different rows at once, b rows each per micro-step (per-device batch): a
micro-step trains DP b consecutive stored rows, so the dataset's group_size G (sort_and_group.py
--group_size, recorded in its stats.json) must be a multiple of DP b. G == DP b is the paper's
layout (one group per data-parallel step). longalign/train/trainer.py checks it on every rank;
scripts/_launch.sh checks it before anything starts, on any number of nodes (longalign/train/launch.py).
Standard library only: the launcher runs it before any framework is imported.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path


def read_layout_stats(stats_file: Path) -> dict:
    """A sort/ or pack/ stats.json (sort_and_group.py), its group_size checked: a positive int."""
    try:
        stats = json.loads(Path(stats_file).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{stats_file}: not JSON ({err})") from err
    group_size = stats.get("group_size") if isinstance(stats, dict) else None
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"{stats_file}: group_size must be a positive int, got {group_size!r}")
    return stats


def rows_per_micro_step(world_size: int, per_device_batch: int, sequence_parallel_size: int = 1) -> int:
    """DP b: the stored rows one micro-step trains; a clear error unless N divides W."""
    if world_size < 1 or sequence_parallel_size < 1 or world_size % sequence_parallel_size:
        raise ValueError(f"world size {world_size} is not a multiple of --sequence_parallel_size "
                         f"{sequence_parallel_size} (scripts: SP): choose one of "
                         f"{[n for n in range(1, world_size + 1) if world_size % n == 0]}")
    return world_size // sequence_parallel_size * per_device_batch


def sort_and_group_command(group_size: int, train_file: str | None = None, max_length: int | None = None) -> str:
    """The sort_and_group.py command that builds groups of `group_size` (the fix the errors name)."""
    words = ["python", "sort_and_group.py"]
    if train_file is not None:
        words += ["--train_file", train_file]
    words += ["--group_size", str(group_size)]
    if max_length is not None:
        words += ["--max_length", str(max_length)]
    return shlex.join(words)


def check_data_parallel_layout(group_size: int, world_size: int, per_device_batch: int,
                               sequence_parallel_size: int = 1, train_file: str | None = None,
                               max_length: int | None = None) -> int:
    """Micro-steps per group, c = G / (DP b); a clear error unless N divides W and DP b divides G.

    DP = world_size / sequence_parallel_size: the ranks that train different rows at once.
    `train_file` and `max_length` (the data's) complete the sort_and_group.py command of the error.
    """
    rows = rows_per_micro_step(world_size, per_device_batch, sequence_parallel_size)
    data_parallel = world_size // sequence_parallel_size
    if group_size < 1 or group_size % rows:
        ranks = (f"world size {world_size}" if sequence_parallel_size == 1 else
                 f"data-parallel size {data_parallel} (world size {world_size} / --sequence_parallel_size "
                 f"{sequence_parallel_size})")
        raise ValueError(
            f"the dataset's group_size {group_size} (rows per data-parallel step, from its stats.json) "
            f"is not a multiple of {ranks} x per-device batch {per_device_batch} = "
            f"{rows}: a micro-step would mix rows of different groups. Rebuild with "
            f"`{sort_and_group_command(rows, train_file, max_length)}` or change the GPU count / batch size.")
    return group_size // rows
