"""Counting launches: ATen ops (on a GPU each is at most one kernel launch) plus fused Triton launches.

A diagnostic for benchmarks and tests: counts depend on shapes only, not on timings, so they are
deterministic on any machine. Every ATen op that reaches the dispatcher is counted, views included
(on a GPU a view launches nothing, so this is an upper bound on launches); the host-side copies the
Triton interpreter makes around an interpreted launch are not counted (compiled launches make none).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from torch.utils._python_dispatch import TorchDispatchMode

from obc_lightning.kernels import LOG


@dataclass
class LaunchCount:
    aten: int = 0  # ATen ops
    triton: int = 0  # fused kernel launches

    @property
    def total(self) -> int:
        return self.aten + self.triton


class _AtenCounter(TorchDispatchMode):
    def __init__(self, count: LaunchCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not LOG.in_launch:
            self.count.aten += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_launches():
    """``with count_launches() as c: ...``; then ``c.aten``, ``c.triton``, ``c.total``."""
    count = LaunchCount()
    start = LOG.launches
    try:
        with _AtenCounter(count):
            yield count
    finally:
        count.triton = LOG.launches - start
