"""Which pending (shape, M) job a free worker takes next.

Shapes of one kernel family (dtype, quantisation block and K: what the kernel compiles in) share their
compiled kernels: N and the expert count are runtime arguments of vLLM's kernel. The tile configs a search
tries depend on M, and neighbouring batch sizes try mostly the same ones. So:

- two workers never run jobs of one family at one M at once: each would compile the same kernels, and a
  search waits on its compiles (on two H200s, bf16 N=320's M=1 job took 16-18 s beside N=160's, and 4 s
  after it);
- a worker that finished a job takes that job's siblings next, which find its kernels in the cache, then the
  next batch size over, whose search the finished one seeds and whose tiles are mostly compiled;
- a worker with no such job starts as far as it can from the batch sizes the others run in its family: two
  workers start at M = 1 and at the largest M and walk towards each other (on two H200s, the M = 3072 job
  run beside M = 4096's compiled the same large tiles at the same time: 18 s against 6 s after it).

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
        order = ends_inward([j.m for j in jobs])
        self.position = {m: i for i, m in enumerate(sorted(order))}  # a batch size's place among the plan's
        rank = {m: i for i, m in enumerate(order)}
        shapes = list(dict.fromkeys(j.shape for j in jobs))  # the plan's order
        self.pending = deque(sorted(jobs, key=lambda j: (rank[j.m], shapes.index(j.shape))))

    def __len__(self) -> int:
        return len(self.pending)

    def take(self, after: Job | None, running: list[Job]) -> Job:
        """The job for a worker that last ran ``after`` (None: it has run nothing) while ``running`` run."""
        busy = {sibling_key(j) for j in running}
        free = [j for j in self.pending if sibling_key(j) not in busy]
        near = [j for j in free if after is not None and family(j.shape) == family(after.shape)
                and self._apart(j, after) <= 1]
        if near:  # a sibling first, then the next batch size over
            pick = min(near, key=lambda j: self._apart(j, after))
        elif free:  # as far as it gets from its family's running jobs; on a tie, from both ends inward
            pick = max(free, key=lambda j: min((self._apart(j, r) for r in running
                                                if family(r.shape) == family(j.shape)), default=len(self.position)))
        else:
            pick = self.pending[0]
        self.pending.remove(pick)
        return pick

    def _apart(self, a: Job, b: Job) -> int:
        return abs(self.position[a.m] - self.position[b.m])

    def put_back(self, job: Job) -> None:
        """A job whose worker died goes first."""
        self.pending.appendleft(job)
