"""Named fault-injection points for the fault tests (tests/test_faults_*.py); inert by default.

A stage calls `fault_point(NAME)` at a moment where a kill matters (between two renames, between
the sort/ and pack/ saves). Nothing happens unless the environment asks for it:

    LONGALIGN_FAULT_PAUSE_AT=<name>   at that point, write the pid to $LONGALIGN_FAULT_READY_FILE
                                      (if set) and sleep until a signal ends the process: the test
                                      then kills it from outside (SIGKILL), as a user or OOM would.
    LONGALIGN_NO_RENAME_EXCHANGE=1    `longalign.storage` swaps directories with two renames
                                      instead of Linux's atomic exchange (the fallback path used
                                      where renameat2 is missing), so that path can be tested too.

Points: storage.new_output_complete (a new output folder is complete, not yet swapped in),
storage.between_renames (two-rename fallback: the old folder moved aside, the new one not yet in),
storage.old_output_swapped_out (the new folder in place, the old one not yet removed),
sort_and_group.between_sort_and_pack (sort/ replaced, pack/ not yet).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PAUSE_ENV = "LONGALIGN_FAULT_PAUSE_AT"
READY_FILE_ENV = "LONGALIGN_FAULT_READY_FILE"
NO_EXCHANGE_ENV = "LONGALIGN_NO_RENAME_EXCHANGE"

NEW_OUTPUT_COMPLETE = "storage.new_output_complete"  # new folder written, not yet swapped in
BETWEEN_RENAMES = "storage.between_renames"  # two-rename fallback: old moved aside, new not in yet
OLD_OUTPUT_SWAPPED_OUT = "storage.old_output_swapped_out"  # new in place, old not yet removed
BETWEEN_SORT_AND_PACK = "sort_and_group.between_sort_and_pack"  # sort/ replaced, pack/ not yet
POINTS = (NEW_OUTPUT_COMPLETE, BETWEEN_RENAMES, OLD_OUTPUT_SWAPPED_OUT, BETWEEN_SORT_AND_PACK)


def fault_point(name: str) -> None:
    """Pause here for an outside kill when $LONGALIGN_FAULT_PAUSE_AT names this point."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {POINTS}")
    if os.environ.get(PAUSE_ENV) != name:
        return
    ready = os.environ.get(READY_FILE_ENV)
    if ready:
        Path(ready).write_text(str(os.getpid()))
    while True:  # until the test's signal ends the process
        if hasattr(signal, "pause"):
            signal.pause()
        else:  # pragma: no cover (Windows)
            time.sleep(1)


def rename_exchange_disabled() -> bool:
    return os.environ.get(NO_EXCHANGE_ENV) == "1"
