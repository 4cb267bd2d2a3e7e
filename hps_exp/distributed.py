"""The process world: who am I (rank), how many are we, which device, and the few collectives the
stages need. Launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set by it) or by a
bare `srun` (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, master = first host of the step's node
list, port derived from the job id). A plain `python -m hps_exp` inside an sbatch script is one
process even with --ntasks>1: only a task of an srun step (which sets SLURM_STEP_NUM_TASKS) joins a
world. Not launched distributed: a one-process World whose collectives are no-ops, so stage code
never branches on "am I distributed".

NCCL on CUDA, gloo on CPU; every collective times out after `timeout_s` (trainer.dist_timeout_s)
instead of hanging forever when one rank died or yields fewer batches.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
DEFAULT_PORT = 29500
# srun without MASTER_PORT: a port derived from the job id in [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN),
# so two multi-rank jobs sharing a node do not collide on one fixed port.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 40000


class DistributedError(RuntimeError):
    """A launch environment or collective that cannot work; the message names the variable or rank."""


def first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list: 'gpu[03-05,07],cpu1' -> 'gpu03', 'a1,a2' -> 'a1'.
    (What `scontrol show hostnames | head -1` prints, without needing scontrol on the compute node.)"""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise DistributedError(f"SLURM_NODELIST={nodelist!r}: cannot read a host name from it")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def launch_env(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """(rank, world_size, local_rank, master_addr, master_port) from torchrun or SLURM; None when the
    process was not launched as part of a multi-process world. torchrun wins when both are set
    (`srun torchrun` sets SLURM_* for the node and RANK for the process)."""
    env = os.environ if env is None else env

    def need(key: str) -> int:
        try:
            return int(env[key])
        except KeyError:
            raise DistributedError(f"{key} is not set but the launch looks distributed; launch with torchrun "
                                   f"or srun") from None
        except ValueError:
            raise DistributedError(f"{key}={env[key]!r} is not an integer") from None

    if "RANK" in env and "WORLD_SIZE" in env:
        world = need("WORLD_SIZE")
        if world <= 1:
            return None
        return dict(rank=need("RANK"), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                    master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                    master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)))
    # Only srun sets the step's task count: the batch script of an sbatch --ntasks=8 job (SLURM_NTASKS=8, no step
    # variables) is one process and must not wait for 7 peers.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env and need("SLURM_STEP_NUM_TASKS") > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist and "MASTER_ADDR" not in env:
            raise DistributedError("SLURM_STEP_NUM_TASKS > 1 but neither SLURM_STEP_NODELIST, SLURM_NODELIST nor "
                                   "MASTER_ADDR is set")
        return dict(rank=need("SLURM_PROCID"), world_size=need("SLURM_STEP_NUM_TASKS"),
                    local_rank=need("SLURM_LOCALID"),
                    # nodelist is set unless MASTER_ADDR is, and set-but-empty: then "" reads as an unreadable list
                    master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist or ""),
                    master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else slurm_port(env))
    return None


def slurm_port(env: Mapping[str, str]) -> int:
    """The rendezvous port of an srun world without MASTER_PORT: derived from SLURM_JOB_ID (every task of a job
    agrees on it; two jobs on one node get different ports unless their ids are SLURM_PORT_SPAN apart)."""
    job = env.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        return DEFAULT_PORT
    return SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a process: its local rank among the devices it sees. Under srun --gpus-per-task=1 or
    --gpu-bind each task sees only its own GPU(s) (CUDA_VISIBLE_DEVICES), so local rank 5 uses device 0."""
    if visible < 1:
        raise DistributedError("no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES?)")
    return local_rank % visible


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (float64 on the collective's device, returned on CPU)."""
        if not self.distributed:
            return values
        t = values.to(self._comm_device(), torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def all_gather_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """[world_size, *values.shape]: every rank's tensor (float64)."""
        if not self.distributed:
            return values.to(torch.float64).unsqueeze(0)
        t = values.to(self._comm_device(), torch.float64).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return torch.stack(out).cpu()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's part of `items` (strided: rank r gets items r, r+W, ...). Shard prompts, never
        responses: a listwise loss needs all responses of a prompt on one rank."""
        return list(items[self.rank::self.world_size])

    def shard_padded(self, items: Sequence[T]) -> tuple[list[T], int]:
        """(part, number of real items). A rank whose strided part is empty (fewer items than ranks,
        e.g. the last micro-batch) gets items[0] as padding and 0 real items: it still runs forward and
        backward, so the collectives match, and the trainer weights its loss by 0."""
        part = self.shard(items)
        if part or not items:
            return part, len(part)
        return [items[0]], 0

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's object on `dst` (a list indexed by rank), None elsewhere."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def gather_all(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _comm_device(self) -> torch.device:
        # NCCL communicates CUDA tensors only; gloo CPU tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def init_world(device: str = "auto", timeout_s: int = 1800, env: Mapping[str, str] | None = None) -> World:
    """Join the process group described by the launch environment (idempotent), or a one-process World."""
    spec = launch_env(env)
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not torch.cuda.is_available():
        raise DistributedError("trainer.device=cuda but no CUDA device is visible")
    if spec is None:
        return World(device=torch.device("cuda") if use_cuda else torch.device("cpu"))
    if use_cuda:   # before init_process_group: NCCL binds the communicator to the current device
        dev = torch.device("cuda", cuda_index(spec["local_rank"], torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", spec["master_addr"])
        os.environ.setdefault("MASTER_PORT", str(spec["master_port"]))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=spec["rank"],
                                world_size=spec["world_size"], timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if use_cuda else {}))
    return World(rank=spec["rank"], world_size=spec["world_size"], local_rank=spec["local_rank"], device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
