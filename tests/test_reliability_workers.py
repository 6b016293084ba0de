"""Campaign: concurrent claiming workers, SIGKILLed at random, while n_masks grows.

Three forked workers claim blocks of one store through lease files (as ``coar worker
RUN --claim`` does). At random moments one of them is killed with SIGKILL and started
again; partway through, the run grows from 40 to 70 masks: a new worker starts with
the larger ``n_masks`` while the older ones still run with the smaller, and every
restart uses the larger. When the last workers exit, the store must be complete
without any further pass (no block lost to the growth or the kills) and equal an
uninterrupted run of 70 masks byte for byte. Figures: bench/RESULTS_reliability.md.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from coarpy.collect import collect
from coarpy.runs import RunConfig, collect_run
from coarpy.store import ComponentDataset

sys.path.insert(0, str(Path(__file__).parent))
from _reliability import (
    SETTINGS,
    in_a_fresh_interpreter,
    record,
    store_files,
    temp_files,
    tiny_setup,
)  # noqa: E402

sys.path.pop(0)

SMALL, LARGE = 40, 70  # n_masks before and after the growth (odd blocks of 2: 20, 35)
EPISODES = 3
KILLS_PER_EPISODE = 10
DELAY = 0.02  # seconds of sleep per forward pass: a run lasts long enough to be hit
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _worker(path: Path, n_masks: int, k: int, n: int) -> int:
    """Fork a claiming worker, as ``coar worker --claim`` runs one (shard k of n first,
    then any free block, with heartbeats); its pid."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            torch.set_num_threads(1)  # no OpenMP pool inherited across the fork
            settings = {**SETTINGS, "n_masks": n_masks}
            cfg = RunConfig(
                factory="_reliability:tiny_setup", path=str(path), **settings,
                factory_args={"delay": DELAY},
            )  # fmt: skip
            collect_run(cfg, shard=(k, n), claim=True, lease_s=2.0, progress=False)
            code = 0
        except BaseException:  # say why in the campaign's output, then exit as a child
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _reap(procs: dict[int, tuple[int, int]]) -> list[tuple[int, int]]:
    """Collect exited workers: [(pid, exit status)]; they leave ``procs``."""
    done = []
    for pid in list(procs):
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            done.append((pid, status))
            del procs[pid]
    return done


def campaign(tmp_path: Path) -> None:
    """The whole campaign, run by the test in a fresh interpreter."""
    made = tiny_setup()
    collect(made["model"], made["components"], made["data"], path=tmp_path / "reference",
            progress=False, **{**SETTINGS, "n_masks": LARGE})  # fmt: skip
    reference = store_files(tmp_path / "reference")
    rng = random.Random(5)
    kills, grown_while_old_ran, restarts, clean_exits = 0, 0, 0, 0
    for episode in range(EPISODES):
        path = tmp_path / f"episode{episode}"
        n_masks = SMALL
        procs = {_worker(path, SMALL, k, 3): (k, SMALL) for k in range(3)}  # pid -> (k, n)
        grow_after = rng.randint(1, 3)  # early: workers of the smaller run still collect
        for i in range(KILLS_PER_EPISODE):
            time.sleep(rng.uniform(0.02, 0.25))
            for _pid, status in _reap(procs):
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
                clean_exits += 1
            if i == grow_after:  # grow while workers of the smaller run still collect
                n_masks = LARGE
                grown_while_old_ran += any(n == SMALL for _, n in procs.values())
                procs[_worker(path, LARGE, 0, 3)] = (0, LARGE)
            if not procs:
                break
            victim = rng.choice(sorted(procs))
            k, _ = procs.pop(victim)
            os.kill(victim, signal.SIGKILL)
            os.waitpid(victim, 0)
            kills += 1
            procs[_worker(path, n_masks, k, 3)] = (k, n_masks)
            restarts += 1
        if n_masks == SMALL:  # the kills ran out first: grow now
            procs[_worker(path, LARGE, 0, 3)] = (0, LARGE)
        deadline = time.monotonic() + 60
        while procs and time.monotonic() < deadline:
            for _pid, status in _reap(procs):
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
                clean_exits += 1
            time.sleep(0.02)
        assert not procs, "workers did not finish"
        ds = ComponentDataset(path)
        assert ds.n_masks == LARGE and ds.missing_blocks() == []  # nothing lost, no extra pass
        ds.sweep()  # the short last block of the smaller run is a leftover, never data
        assert store_files(path) == reference, f"episode {episode} differs"
        assert temp_files(path) == []
        assert not list((path / "leases").glob("*.lease"))
        saved = RunConfig.load(path)  # a late worker of the smaller run keeps the growth
        assert (saved.n_masks, saved.factory_args) == (LARGE, {"delay": DELAY})

    record(
        "workers",
        f"""
## Concurrent workers, kills and growth (tests/test_reliability_workers.py)

Three forked workers claim blocks through lease files; one at a time is SIGKILLed at
a random moment and restarted; partway through, `n_masks` grows from {SMALL} to
{LARGE} (blocks of 2) while workers of the smaller run still collect.

| figure | value |
|---|---|
| episodes | {EPISODES} |
| SIGKILLs of claiming workers | {kills} |
| restarts | {restarts} |
| growths while a worker of the smaller run still collected | {grown_while_old_ran} of {EPISODES} |
| workers that exited cleanly | {clean_exits} |
| stores complete when the last worker exited (no block lost) | {EPISODES} of {EPISODES} |
| stores byte-identical to an uninterrupted {LARGE}-mask run | {EPISODES} of {EPISODES} |
| leases and temporary files left | 0 |
""",
    )


def test_concurrent_workers_with_kills_and_growth_lose_no_block(tmp_path):
    """The campaign, in a fresh interpreter (see ``in_a_fresh_interpreter``)."""
    in_a_fresh_interpreter(__file__, tmp_path, timeout=600)


if __name__ == "__main__":
    torch.set_num_threads(1)  # no OpenMP pool in the process that forks
    campaign(Path(sys.argv[1]))
