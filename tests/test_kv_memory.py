"""The KV pool's memory: lazily committed by default, fully committed with ``prefault`` (what ``airun serve`` does)."""

from __future__ import annotations

from pathlib import Path

import torch

from airun.engine.model_runner import zeros_lazy

MIB = 2**20


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_lazy_pool_commits_only_what_is_written() -> None:
    before = rss()
    t = zeros_lazy((64, 1024, 1024), torch.uint8, torch.device("cpu"))  # 64 MiB
    assert rss() - before < 8 * MIB
    t[:16].fill_(1)  # 16 MiB written
    grown = rss() - before
    assert 14 * MIB < grown < 24 * MIB, grown / MIB
    assert int(t[16:].sum()) == 0


def test_prefaulted_pool_is_committed_at_once_and_zero() -> None:
    before = rss()
    t = zeros_lazy((64, 1024, 1024), torch.uint8, torch.device("cpu"), prefault=True)
    assert rss() - before > 60 * MIB
    assert int(t.sum()) == 0
