"""Data-parallel training over `mx.distributed`: the `World` the training loop and the run share.

Started by `mlx.launch` (ring backend over TCP, or MPI), every process runs the same `pudl run` and MLX tells
each one its rank. Rank 0 runs the recipe as a single process would (teacher, sampling, scoring, the cache,
checkpoints, adapters, logs, evaluation). At each training stage it sends the other ranks the round's
preference data and its current LoRA + optimizer state once; then every rank trains on its own slice of
every global batch and the gradients are averaged, so all ranks apply the same update and stay identical.
The other ranks write nothing (`pudl.loop.follow`). A process started without a launcher is a world of one: nothing is
communicated and nothing changes.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from pudl import wire
from pudl.errors import UserError

# Set by the launchers in every process they start: mlx.launch (ring, jaccl: MLX_RANK), mpirun (Open MPI, MPICH).
LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class World:
    """This process's rank among `size` training processes and the collectives training needs."""

    def __init__(self, group=None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.size

    def all_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group) if self.size > 1 else x

    def barrier(self):
        """Return once every rank got here (a one-element all_sum)."""
        if self.size > 1:
            mx.eval(self.all_sum(mx.array([1.0])))

    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank (the others pass None): its length, then its bytes (`pudl.wire`: data only,
        no code), each as an all_sum the other ranks feed zeros into."""
        if self.size == 1:
            return obj
        data = wire.encode(obj) if self.is_main else b""
        n = int(self.all_sum(mx.array([len(data)], mx.int64)).item())
        buf = np.frombuffer(data, np.uint8) if self.is_main else np.zeros(n, np.uint8)
        received = self.all_sum(mx.array(buf))
        mx.eval(received)
        return obj if self.is_main else wire.decode(np.array(received).tobytes())

    def weighted_mean(self, tree, weight: float):
        """sum_r weight_r * tree_r / sum_r weight_r over the ranks, with one all_sum of every float leaf packed
        into a single vector (the same result on every rank). The weight is the items (pairs, groups) of this
        rank's slice, so the mean is the one over the whole global batch even when the slices differ in size.
        (mlx.nn.average_gradients takes the plain mean of the ranks, which a short last batch would bias.)"""
        if self.size == 1:
            return tree
        leaves = [v for _, v in tree_flatten(tree)]
        packed = mx.concatenate([v.astype(mx.float32).reshape(-1) * weight for v in leaves] +
                                [mx.array([weight], mx.float32)])
        total = self.all_sum(packed)
        total = total[:-1] / total[-1]
        out, offset = [], 0
        for v in leaves:
            out.append(total[offset : offset + v.size].reshape(v.shape).astype(v.dtype))
            offset += v.size
        it = iter(out)
        return tree_map(lambda _: next(it), tree)  # tree_map visits leaves in tree_flatten's order

    def sync_training_state(self, student, optimizer, step: int) -> int:
        """Give every rank rank 0's LoRA weights, optimizer state and step (rank 0 read the checkpoint, or
        carries the previous round's adapter); return the step."""
        if self.size == 1:
            return step
        state = None
        if self.is_main:
            state = {"step": step, "lora": {k: np.array(v) for k, v in student.lora_state().items()},
                     "opt": [(k, np.array(v)) for k, v in tree_flatten(optimizer.state)]}
        state = self.broadcast_object(state)
        if not self.is_main:
            student.load_lora_state({k: mx.array(v) for k, v in state["lora"].items()})
            optimizer.state = tree_unflatten([(k, mx.array(v)) for k, v in state["opt"]])
            mx.eval(optimizer.state)
        return int(state["step"])


SINGLE = World()


def launched() -> bool:
    """True in a process a distributed launcher started with others (`mlx.launch -n 1` writes an empty ring
    hostfile, which MLX cannot parse: that is a world of one)."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile is not None and "MLX_RANK" in os.environ and not _nonempty(hostfile):
        return False
    return any(k in os.environ for k in LAUNCH_ENV)


def _nonempty(path: str) -> bool:
    try:
        return bool(Path(path).read_text().strip())
    except OSError:
        return False


@cache
def init_world(backend: str = "any") -> World:
    """The world of this process: SINGLE unless a launcher started it (then MLX connects the ranks once)."""
    if not launched():
        return SINGLE
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise UserError(f"started by a distributed launcher, but mx.distributed could not connect the ranks "
                        f"(backend {backend!r}): {e}") from None
    return World(group) if group.size() > 1 else SINGLE
