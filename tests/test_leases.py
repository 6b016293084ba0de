"""Block leases (coarpy.runs.leases): one holder per block, stale leases taken over,
every lease released when its holder is done."""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from coarpy.errors import ArgumentError, CollectError
from coarpy.runs import leases
from coarpy.store import ComponentDataset

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from _launch_setup import dead_pid, empty_store, write_lease  # noqa: E402

sys.path.remove(str(TESTS))


@pytest.fixture
def store(tmp_path) -> ComponentDataset:
    """An empty store of 8 blocks (meta.json only)."""
    return empty_store(tmp_path / "run")


def lease_files(ds: ComponentDataset) -> list[str]:
    return sorted(p.name for p in (Path(ds.path) / "leases").iterdir())


# -- claiming ---------------------------------------------------------------------------


def test_a_claim_creates_a_lease_file_naming_its_holder(store):
    with leases.Claims(store, [3]) as claims:
        assert claims.acquire(3)
        lease = json.loads(leases.lease_path(Path(store.path), 3).read_text())
        assert (lease["host"], lease["pid"], lease["token"]) == (
            platform.node(),
            os.getpid(),
            claims.token,
        )


def test_a_held_lease_is_refused_to_another_worker(store):
    with leases.Claims(store, [0]) as a, leases.Claims(store, [0]) as b:
        assert a.acquire(0)
        assert not b.acquire(0)
    assert lease_files(store) == []  # released on exit


def test_iterating_yields_the_shards_blocks_first_then_the_others(store):
    with leases.Claims(store, shard=(1, 3)) as claims:
        order = list(claims)  # nothing is computed, so every block is claimed in turn
    assert order == [1, 4, 7, 0, 2, 3, 5, 6]


def test_claims_open_a_store_that_did_not_exist_when_they_were_made(tmp_path):
    claims = leases.Claims(tmp_path / "run", shard=(0, 2))
    with claims:
        empty_store(tmp_path / "run")  # collect creates the store, then iterates
        assert list(claims)[:4] == [0, 2, 4, 6]


# -- stale leases -------------------------------------------------------------------------


def test_a_lease_nobody_renewed_within_lease_s_is_taken_over(store):
    write_lease(store, 2, host="elsewhere", pid=1, age=30)
    write_lease(store, 3, host="elsewhere", pid=1, age=1)
    with leases.Claims(store, [2, 3], lease_s=10) as claims:
        assert claims.acquire(2)
        assert not claims.acquire(3)
        lease = json.loads(leases.lease_path(Path(store.path), 2).read_text())
        assert (lease["pid"], lease["token"]) == (os.getpid(), claims.token)


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(store):
    write_lease(store, 1, host=platform.node(), pid=dead_pid())
    write_lease(store, 2, host=platform.node(), pid=os.getppid())  # alive
    with leases.Claims(store, [1, 2], lease_s=600) as claims:
        assert claims.acquire(1)
        assert not claims.acquire(2)


def test_racing_takers_of_one_stale_lease_leave_exactly_one_holder(store):
    write_lease(store, 4, host="elsewhere", pid=1, age=60)
    claimers = [leases.Claims(store, [4], lease_s=10) for _ in range(8)]
    won = [False] * len(claimers)
    start = threading.Barrier(len(claimers))

    def take(i):
        start.wait()
        won[i] = claimers[i].acquire(4)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(claimers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(won) == 1
    holder = claimers[won.index(True)]
    assert json.loads(leases.lease_path(Path(store.path), 4).read_text())["token"] == holder.token


def test_a_live_holder_renews_its_lease_so_it_never_goes_stale(store):
    with leases.Claims(store, [0], lease_s=1.0) as holder:
        assert holder.acquire(0)
        time.sleep(1.6)
        with leases.Claims(store, [0], lease_s=1.0) as other:
            other.host = "elsewhere"  # judge by age alone, as another machine would
            assert not other.acquire(0)


# -- release ------------------------------------------------------------------------------


def test_leaving_releases_every_lease_still_held(store):
    with leases.Claims(store, [0, 1, 2]) as claims:
        assert claims.acquire(0) and claims.acquire(2)
        assert lease_files(store) == ["b000000.lease", "b000002.lease"]
    assert lease_files(store) == []


def test_a_lease_taken_over_by_another_worker_is_not_deleted_by_the_old_holder(store):
    with leases.Claims(store, [5], lease_s=10) as old:
        assert old.acquire(5)
        stale = time.time() - 60
        os.utime(leases.lease_path(Path(store.path), 5), (stale, stale))  # old looks dead
        with leases.Claims(store, [5], lease_s=10) as new:
            assert new.acquire(5)
            old.__exit__(None, None, None)  # the old holder wakes up and leaves
            lease = json.loads(leases.lease_path(Path(store.path), 5).read_text())
            assert lease["token"] == new.token
    assert lease_files(store) == []


def test_leases_of_finished_blocks_left_by_dead_workers_are_swept(store):
    write_lease(store, 0, host="elsewhere", pid=1)  # live-looking, but its block is done
    keep = torch.ones(3, store.n_components, dtype=torch.bool)
    store.write_block(0, keep, torch.zeros(3, store.n_examples))
    with leases.Claims(store, [0]) as claims:
        assert list(claims) == []
    assert lease_files(store) == []


# -- refusals -------------------------------------------------------------------------------


def test_claiming_refuses_a_store_on_an_object_store():
    with pytest.raises(ArgumentError, match="POSIX filesystem"):
        leases.Claims("memory://coar-test/refuse", [0])


@pytest.mark.parametrize("lease_s", [0, -1.0, True, "60"])
def test_a_lease_time_that_is_not_a_positive_number_is_refused(store, lease_s):
    with pytest.raises(ArgumentError, match="lease_s must be a positive number of seconds"):
        leases.Claims(store, [0], lease_s=lease_s)


# -- liveness (issue #16) -----------------------------------------------------------------


def test_a_holder_that_makes_no_progress_stops_renewing_and_is_taken_over(store):
    with leases.Claims(store, [0], lease_s=0.4, stall_s=0.2) as hung:
        assert hung.acquire(0)
        time.sleep(1.2)  # no forward pass in this process meanwhile
        with leases.Claims(store, [0], lease_s=0.4) as other:
            other.host = "elsewhere"  # judge by age alone, as another machine would
            assert other.acquire(0)


def test_a_holder_that_makes_progress_keeps_its_lease(store):
    from coarpy._engine import mark_progress

    with leases.Claims(store, [0], lease_s=0.4, stall_s=0.2) as busy:
        assert busy.acquire(0)
        for _ in range(12):
            mark_progress()  # a forward pass finished
            time.sleep(0.1)
        with leases.Claims(store, [0], lease_s=0.4) as other:
            other.host = "elsewhere"
            assert not other.acquire(0)


def test_a_waiting_worker_says_what_it_waits_for_and_gives_up_after_max_wait_s(store, caplog):
    path = write_lease(store, 0, host="gpu7", pid=4242)
    stop = threading.Event()

    def renew():  # a live, distant holder that never finishes its block
        while not stop.wait(0.05):
            os.utime(path)

    keeper = threading.Thread(target=renew)
    keeper.start()
    try:
        with (
            caplog.at_level("INFO", logger="coarpy.runs.leases"),
            leases.Claims(store, [0], lease_s=5, max_wait_s=0.5) as claims,
            pytest.raises(CollectError, match=r"Waited \d+ s \(max_wait_s=0.5\)"),
        ):
            list(claims)
    finally:
        stop.set()
        keeper.join()
    said = [r.getMessage() for r in caplog.records]
    assert any(
        "Waiting for blocks other workers hold: block 0 (gpu7:4242, renewed" in m for m in said
    )


def test_a_stray_file_in_leases_is_ignored_with_a_warning(store):
    keep = torch.ones(3, store.n_components, dtype=torch.bool)
    for b in range(store.n_blocks):
        start, stop = store.block_rows(b)
        store.write_block(b, keep[: stop - start], torch.zeros(stop - start, store.n_examples))
    folder = Path(store.path) / "leases"
    folder.mkdir(exist_ok=True)
    (folder / "notes.lease").write_text("mine")
    (folder / "b12x.lease").write_text("")
    with (
        pytest.warns(UserWarning, match=r"is not a lease file") as seen,
        leases.Claims(store) as claims,
    ):
        assert list(claims) == []
    assert {Path(str(w.message).split()[0]).name for w in seen} == {"notes.lease", "b12x.lease"}
    assert sorted(p.name for p in folder.iterdir()) == ["b12x.lease", "notes.lease"]
