"""The worker of the suite's one torchrun launch (helpers.torchrun_cases): `torchrun --nproc_per_node N
-m helpers.torchrun_worker SPEC` runs every case of SPEC, each on its ranks as in a launch of its own
world size, through its module's `run_launch_case` (train.py's build_trainer -> Trainer.train, as in
the tests). The launch puts the repository root (train.py) and tests/ (`helpers`) on PYTHONPATH."""
from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch

from helpers.torchrun_cases import LAUNCH_TIMEOUT_S


@contextlib.contextmanager
def case_process_group(case: dict, launch_store):
    """Rank r < case['world'] of the launch as rank r of a launch of case['world'] processes: the
    environment such a launch gives (a store of the case's own, hosted by rank 0, its port passed on
    through the launch's store), so accelerate / DeepSpeed start the process group from it as in
    that launch. After the case: its process group closed, and the state DeepSpeed, accelerate and
    transformers keep about it (group references, singletons, the DeepSpeed config, the attention
    registry, where Ulysses wraps the core attention) and the environment put back, so the next
    case starts as in a fresh process."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    rank, name = os.environ["RANK"], case["name"]
    environ, attention = dict(os.environ), dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    server = None
    if rank == "0":
        server = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], 0, is_master=True, wait_for_workers=False,
                                            timeout=timedelta(seconds=LAUNCH_TIMEOUT_S))
        launch_store.set(f"{name}/port", str(server.port))
    world = str(case["world"])
    os.environ.update(WORLD_SIZE=world, LOCAL_WORLD_SIZE=world, GROUP_WORLD_SIZE=world, ROLE_WORLD_SIZE=world,
                      MASTER_PORT=launch_store.get(f"{name}/port").decode())
    yield
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
        if deepspeed_comm is not None and deepspeed_comm.cdb is not None:
            deepspeed_comm.destroy_process_group()  # also drops DeepSpeed's group references (SP groups too)
        else:
            torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if "deepspeed" in sys.modules:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
    ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
    ALL_ATTENTION_FUNCTIONS._local_mapping.update(attention)
    os.environ.clear()
    os.environ.update(environ)
    launch_store.set(f"{name}/done/{rank}", "1")
    if server is not None:  # rank 0 hosts the case's store: until every rank is done with it
        launch_store.wait([f"{name}/done/{r}" for r in range(case["world"])])


def worker_main(spec_file: str) -> None:
    """Every case of the spec, one after the other: a case of world size W runs on ranks 0..W-1
    (`run_launch_case` of its module), the other ranks skip it. A case that raises leaves its
    traceback in its folder and ends the launch."""
    spec = json.loads(Path(spec_file).read_text())
    rank = int(os.environ["RANK"])
    launch_store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                              is_master=False, timeout=timedelta(seconds=LAUNCH_TIMEOUT_S))
    gc.freeze()  # as frozen_gc does in a test process; again after each case, for what it imported
    for case in spec["cases"]:
        if rank >= case["world"]:
            continue
        try:
            with case_process_group(case, launch_store):
                result = importlib.import_module(case["module"]).run_launch_case(case)
                torch.save(result, os.path.join(case["out"], f"rank{result['rank']}.pt"))
            gc.collect()
            gc.freeze()
        except BaseException:
            Path(case["out"], f"error_rank{rank}.txt").write_text(traceback.format_exc())
            raise


if __name__ == "__main__":
    (spec_path,) = sys.argv[1:]
    worker_main(spec_path)
