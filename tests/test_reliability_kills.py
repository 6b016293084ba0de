"""Campaign: SIGKILL a collecting process at random moments, resume, compare bytes.

A forked child collects a small store (30 blocks, one fsync'd file each) and is killed
with SIGKILL after a random delay drawn uniformly over an uninterrupted run's
duration, so the kills land anywhere: while the model is built, while ``meta.json``
is created, while a block is computed, written, fsynced or renamed. The next child
resumes the same directory; when one finishes, the episode ends with an in-process
resume, and the store must equal an uninterrupted run's byte for byte, with no
temporary file left behind. Figures: bench/RESULTS_reliability.md.
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

N_KILLS = 60
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _child(path: Path) -> int:
    """Fork a process that collects the store at ``path``; its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 3
        try:
            torch.set_num_threads(1)  # no OpenMP pool inherited across the fork
            made = tiny_setup()
            collect(made["model"], made["components"], made["data"], path=path, progress=False,
                    **SETTINGS)  # fmt: skip
            code = 0
        except BaseException:  # say why in the campaign's output, then exit as a child
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def campaign(tmp_path: Path) -> None:
    """The whole campaign, run by the test in a fresh interpreter."""
    made = tiny_setup()
    collect(made["model"], made["components"], made["data"], path=tmp_path / "reference",
            progress=False, **SETTINGS)  # fmt: skip
    reference = store_files(tmp_path / "reference")
    durations = []
    for i in range(3):  # the fastest of three uninterrupted runs, fork included
        started = time.perf_counter()
        assert _wait_or_kill(_child(tmp_path / f"timing{i}"), started + 120), "a run hung"
        durations.append(time.perf_counter() - started)
    duration = min(durations)

    rng = random.Random(16)
    kills, episodes, finished_by_child, tries = 0, 0, 0, 0
    before_meta, mid_write, blocks_at_kill = 0, 0, []
    while kills < N_KILLS:
        path = tmp_path / f"episode{episodes}"
        while kills < N_KILLS:
            tries += 1
            assert tries < 20 * N_KILLS, "the kills keep missing the runs: timing is off"
            fresh = not path.exists()
            pid = _child(path)
            forked = time.perf_counter()
            exited = _wait_or_kill(pid, forked + rng.uniform(0.0, duration))
            if exited:
                finished_by_child += 1
                if fresh:  # a whole run: the kill window follows the machine's speed now
                    duration = min(duration, 1.2 * (time.perf_counter() - forked))
                break
            kills += 1
            if not (path / "meta.json").exists():
                before_meta += 1
                continue
            mid_write += bool([t for t in temp_files(path) if t.startswith("blocks/")])
            blocks_at_kill.append(len(list((path / "blocks").glob("*.blk"))))
        # resume in this process, then the store must be the uninterrupted one
        collect(made["model"], made["components"], made["data"], path=path, progress=False,
                **SETTINGS)  # fmt: skip
        assert store_files(path) == reference, f"episode {episodes} differs"
        assert temp_files(path) == [], "temporary files of killed writers were not swept"
        episodes += 1

    assert kills >= 50
    record(
        "kills",
        f"""
## SIGKILL at random moments (tests/test_reliability_kills.py)

A forked process collects a 30-block store (60 masks, 64 components, 48 examples) and
is killed with SIGKILL after a delay drawn uniformly from [0, {duration:.2f} s], about
the length of an uninterrupted run; the next process resumes the same directory.

| figure | value |
|---|---|
| SIGKILLs | {kills} |
| episodes (store started, killed repeatedly, finished) | {episodes} |
| kills before `meta.json` existed | {before_meta} |
| kills that left a block's temporary file (killed mid-write) | {mid_write} |
| finished blocks at the moment of a kill (min / median / max) | {_spread(blocks_at_kill)} |
| runs that finished before their kill | {finished_by_child} |
| resumed stores byte-identical to an uninterrupted run | {episodes} of {episodes} |
| temporary files left after the resume | 0 |
""",
    )


def _wait_or_kill(pid: int, deadline: float) -> bool:
    """Wait for the child until ``deadline``, then SIGKILL it; True if it exited first
    (with status 0: a finished run)."""
    while time.perf_counter() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
            return True
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)  # a no-op if it finished just now
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, status
        return True
    return False


def _spread(values: list[int]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[0]} / {ordered[len(ordered) // 2]} / {ordered[-1]}"


@pytest.mark.slow  # about 20 s: the longest campaign
def test_sigkills_at_random_moments_never_change_the_resumed_store(tmp_path):
    """The campaign, in a fresh interpreter (see ``in_a_fresh_interpreter``)."""
    in_a_fresh_interpreter(__file__, tmp_path, timeout=600)


if __name__ == "__main__":
    torch.set_num_threads(1)  # no OpenMP pool in the process that forks
    campaign(Path(sys.argv[1]))
