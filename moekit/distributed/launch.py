"""moekit's processes under torchrun: the process group from torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, ... for its c10d rendezvous), with a timeout on every collective, so that a rank that dies or hangs
makes the others stop with a message naming the collective instead of waiting forever."""

from __future__ import annotations

import os
import re
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_S = 60.0


def init_from_env(
    processes: int, timeout_s: float = TIMEOUT_S, command: str = "train", multiple: bool = False
) -> dist.ProcessGroup:
    """The default process group of `processes` ranks (multiple: of a multiple of them) that torchrun started (gloo
    on CPUs, NCCL on GPUs) for `moekit command --ep processes`."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"--ep {processes} needs {processes} processes started by torchrun: allowed "
            f"torchrun --nproc-per-node {processes} -m moekit {command} ... --ep {processes}"
        )
    world = int(os.environ["WORLD_SIZE"])
    if world % processes if multiple else world != processes:
        allowed = "a multiple of --ep (the rest data parallel)" if multiple else "as many processes as --ep"
        raise ValueError(f"--ep {processes} with {world} processes: allowed {allowed}")
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    global _health
    _health = dist.new_group(backend="gloo")  # for naming the ranks that stopped answering, on a failure
    return dist.group.WORLD


_health: dist.ProcessGroup | None = None
CHECK_S = 5.0  # how long rank 0 waits for the others when it looks for the ones that stopped


def failure_message(error: BaseException, timeout_s: float) -> str:
    """One line for a collective that failed on this rank: which ranks did not answer (rank 0 asks every rank on
    a side group: a monitored barrier), else the collective's own first line."""
    rank, cause = dist.get_rank(), (str(error).strip().splitlines() or [type(error).__name__])[0]
    cause = re.sub(r"^\[[^\]]*\] ", "", cause)  # gloo's source location
    missing = ""
    if _health is not None:
        try:
            dist.monitored_barrier(group=_health, timeout=timedelta(seconds=CHECK_S), wait_all_ranks=True)
        except RuntimeError as e:
            found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(e))
            missing = f"; rank(s) {found[1].strip()} did not answer: stopped or hung" if found else ""
    return f"rank {rank}: a collective failed after up to {timeout_s:g} s ({cause}){missing}"


def finish(code: int) -> None:
    """Leave the process group and exit with `code`: together (a barrier) when the run went well, then without the
    interpreter's finalization, during which gloo's worker threads, still referenced by the model's process
    groups, were seen to abort the process (SIGABRT) now and then."""
    if code == 0:
        dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_main() -> bool:
    """Whether this process writes (files, progress, metrics): rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0
