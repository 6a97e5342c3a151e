"""Process-group setup: one process, or one of WORLD_SIZE started by torchrun (NCCL on GPUs, one
per local rank; gloo on CPU), and the CPU cores each local process may use."""
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: Optional[str] = None) -> Dist:
    """This process's place in the run (initialising the process group under torchrun)."""
    want = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, want)
    if not dist.is_initialized():
        if want.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            want = torch.device("cuda", local)
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), want)


def all_reduce(t: torch.Tensor, d: Dist, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the ranks (nothing with one process); returns t."""
    if d.world_size > 1:
        dist.all_reduce(t, op=op)
    return t


def cores_per_local_rank() -> int:
    """The CPU cores this process may run on (its affinity mask, which respects taskset/cgroup
    cpusets, unlike os.cpu_count), shared by the LOCAL_WORLD_SIZE processes torchrun started on
    this node. At least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1), 1)
