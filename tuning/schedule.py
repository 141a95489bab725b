"""Which pending (shape, M) job a free worker takes next.

Shapes of one kernel family (dtype, quantisation block and K: what the kernel compiles in) share their
compiled kernels at a batch size: N and the expert count are runtime arguments of vLLM's kernel. The
tile configs a search tries depend mostly on M. So:

- two workers never run jobs of one family at one M at once: each would compile the same kernels, and a
  search waits on its compiles (on two H200s, bf16 N=320's M=1 job took 16-18 s beside N=160's, and 4 s
  after it);
- a worker that finished a job takes that job's siblings next, which find its kernels in the cache;
- batch sizes are taken from both ends inward (1, 4096, 2, 3072, ...), so workers that run at once need
  different tiles, and every job after the first two of a shape has a finished neighbour to seed it.

A worker never waits for a job: when every pending job has a sibling running, it takes the first.
"""

from __future__ import annotations

from collections import deque

from .jobs import Job
from .shapes import MoeShape


def family(shape: MoeShape) -> tuple:
    """What vLLM's kernel compiles in for a shape (with the tile config and M's specialisations)."""
    return shape.dtype, shape.block_shape, shape.k


def sibling_key(job: Job) -> tuple:
    return family(job.shape), job.m


def ends_inward(ms: list[int]) -> list[int]:
    """1, 2, 4, 8 -> 1, 8, 2, 4: the smallest, the largest, the next smallest, ..."""
    s, out = sorted(set(ms)), []
    while s:
        out.append(s.pop(0))
        if s:
            out.append(s.pop())
    return out


class JobQueue:
    def __init__(self, jobs: list[Job]):
        rank = {m: i for i, m in enumerate(ends_inward([j.m for j in jobs]))}
        shapes = list(dict.fromkeys(j.shape for j in jobs))  # the plan's order
        self.pending = deque(sorted(jobs, key=lambda j: (rank[j.m], shapes.index(j.shape))))

    def __len__(self) -> int:
        return len(self.pending)

    def take(self, after: Job | None, running: list[Job]) -> Job:
        """The job for a worker that last ran ``after`` (None: it has run nothing) while ``running`` run."""
        busy = {sibling_key(j) for j in running}
        mine = sibling_key(after) if after is not None else None
        pick = (next((j for j in self.pending if sibling_key(j) == mine), None)
                or next((j for j in self.pending if sibling_key(j) not in busy), None)
                or self.pending[0])
        self.pending.remove(pick)
        return pick

    def put_back(self, job: Job) -> None:
        """A job whose worker died goes first."""
        self.pending.appendleft(job)
