"""Named points where the crash tests kill the process: ``RLHF_KILL_AT=NAME[:N]`` sends SIGKILL
to this process the N-th time (default: first) it passes point NAME.

Runs that do not set the variable pay one environment lookup per point. The points sit where
a crash hurts most (mid-write, mid-join, between a stage's work and its bookkeeping); the
harness in ``tests/online/test_crash.py`` kills ``rlhf loop`` at each of them in turn and checks
that re-running the same command gives what an uninterrupted run gives.
"""

from __future__ import annotations

import os
import signal

_passes: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("RLHF_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if name == target:
        _passes[name] = _passes.get(name, 0) + 1
        if _passes[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
