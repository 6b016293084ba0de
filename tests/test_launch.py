"""Launchers: however a run is spread over processes, engines and failures, its store
ends up byte for byte equal to the store of one uninterrupted in-process run."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from coarpy import _leases, launch, runs
from coarpy.config import RunConfig
from coarpy.store import ComponentDataset

TESTS = Path(__file__).parent
FACTORY = "_launch_setup:setup"
SETTINGS = {"n_masks": 24, "alpha": 0.2, "seed": 3, "block_size": 3}  # 8 blocks


def config(path, *, n_masks: int = SETTINGS["n_masks"], **factory_args) -> RunConfig:
    settings = {**SETTINGS, "n_masks": n_masks}
    return RunConfig(factory=FACTORY, path=str(path), factory_args=factory_args, **settings)


def block_bytes(path) -> dict[str, bytes]:
    ds = ComponentDataset(path)
    return {ds.block_path(b).name: ds.block_path(b).read_bytes() for b in ds.done_blocks()}


@pytest.fixture(autouse=True)
def factory_importable(monkeypatch):
    """The factory module is importable here and in every worker process, which runs
    one torch thread (as this process does), so results agree bit for bit."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), *sys.path]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Block bytes of one uninterrupted in-process run."""
    sys.path.insert(0, str(TESTS))
    try:
        path = tmp_path_factory.mktemp("reference") / "run"
        launch.worker(config(path), shard=None)
    finally:
        sys.path.remove(str(TESTS))
    found = block_bytes(path)
    assert len(found) == 8
    return found


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lease(ds: ComponentDataset, block: int, *, host: str, pid: int, age: float = 0.0):
    path = _leases.lease_path(Path(ds.path), block)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "time": time.time(), "token": "x"}))
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


@pytest.fixture
def store(tmp_path, reference):
    """An empty store of the reference settings (meta.json only)."""
    return _empty(tmp_path / "run")


def _empty(path: Path) -> ComponentDataset:
    from coarpy.collect import collect

    setup = config(path).build()
    return collect(
        setup.model, setup.components, setup.data, path=path, blocks=[], progress=False,
        **SETTINGS,
    )  # fmt: skip


# -- devices ------------------------------------------------------------------------


def test_parse_devices_gives_one_entry_per_worker():
    assert launch.parse_devices(["cuda:1", "cpu:2"]) == ["cuda:1", "cpu", "cpu"]
    assert launch.parse_devices("cpu") == ["cpu"]


@pytest.mark.parametrize("bad", ["gpu:0", "cuda", "cpu:0", "cpu:x", ""])
def test_parse_devices_rejects_other_spellings(bad):
    with pytest.raises(ValueError, match="cuda:INDEX|names no device"):
        launch.parse_devices(bad)


def test_a_gpu_worker_sees_only_its_gpu_numbered_as_the_parent_sees_it(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    env, device = launch._child_env("cuda:1", threads=3)
    assert (env["CUDA_VISIBLE_DEVICES"], device, env["OMP_NUM_THREADS"]) == ("6", "cuda:0", "3")
    env, device = launch._child_env("cpu", threads=1)
    assert (env["CUDA_VISIBLE_DEVICES"], device) == ("", "cpu")
    with pytest.raises(ValueError, match="not visible"):
        launch._child_env("cuda:2", threads=1)


def test_workers_elsewhere_get_an_absolute_store_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sent = launch._config_from_text(launch._portable(config("runs/x")))
    assert sent.path == str(tmp_path / "runs" / "x")
    assert launch._config_from_text(launch._portable(config("s3://b/x"))).path == "s3://b/x"


# -- leases ---------------------------------------------------------------------------


def test_a_held_lease_is_refused_to_another_worker(store):
    with _leases.Claims(store, [0]) as a, _leases.Claims(store, [0]) as b:
        assert a.acquire(0)
        assert not b.acquire(0)
    assert not list((Path(store.path) / "leases").iterdir())  # released on exit


def test_a_lease_nobody_renewed_within_lease_s_is_taken_over(store):
    write_lease(store, 2, host="elsewhere", pid=1, age=30)
    write_lease(store, 3, host="elsewhere", pid=1, age=1)
    with _leases.Claims(store, [2, 3], lease_s=10) as claims:
        assert claims.acquire(2)
        assert not claims.acquire(3)
        lease = json.loads(_leases.lease_path(Path(store.path), 2).read_text())
        assert (lease["pid"], lease["token"]) == (os.getpid(), claims.token)


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(store):
    write_lease(store, 1, host=platform.node(), pid=dead_pid())
    write_lease(store, 2, host=platform.node(), pid=os.getppid())  # alive
    with _leases.Claims(store, [1, 2], lease_s=600) as claims:
        assert claims.acquire(1)
        assert not claims.acquire(2)


def test_racing_takers_of_one_stale_lease_leave_exactly_one_holder(store):
    write_lease(store, 4, host="elsewhere", pid=1, age=60)
    claimers = [_leases.Claims(store, [4], lease_s=10) for _ in range(8)]
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
    assert json.loads(_leases.lease_path(Path(store.path), 4).read_text())["token"] == holder.token


def test_a_live_holder_renews_its_lease_so_it_never_goes_stale(store):
    with _leases.Claims(store, [0], lease_s=1.0) as holder:
        assert holder.acquire(0)
        time.sleep(1.6)
        with _leases.Claims(store, [0], lease_s=1.0) as other:
            other.host = "elsewhere"  # judge by age alone, as another machine would
            assert not other.acquire(0)


def test_claiming_refuses_a_store_on_an_object_store(tmp_path):
    ds = _empty_remote(f"memory://coar-test-{tmp_path.name}/refuse")
    with pytest.raises(ValueError, match="POSIX filesystem"):
        _leases.Claims(ds, [0])


def _empty_remote(url: str) -> ComponentDataset:
    from coarpy.collect import collect

    setup = config(url).build()
    return collect(
        setup.model, setup.components, setup.data, path=url, blocks=[], progress=False,
        **SETTINGS,
    )  # fmt: skip


# -- collect: claim mode, blocks, heartbeats -------------------------------------------


def test_claim_mode_alone_fills_the_store_of_a_plain_run(tmp_path, reference):
    run = tmp_path / "run"
    launch.worker(config(run), shard="1/3", claim=True)
    assert block_bytes(run) == reference
    assert not list((run / "leases").iterdir())


def test_claim_mode_takes_over_the_blocks_of_a_dead_worker(store, reference):
    for b in (0, 2, 5):
        write_lease(store, b, host=platform.node(), pid=dead_pid())
    launch.worker(config(store.path), shard="0/2", claim=True)
    assert block_bytes(store.path) == reference


def test_claim_mode_waits_for_a_block_a_live_worker_holds_then_takes_it_when_freed(
    store, reference
):
    other = _leases.Claims(store, [6], lease_s=600).__enter__()
    assert other.acquire(6)
    timer = threading.Timer(1.0, other.__exit__, (None, None, None))  # gives up unfinished
    timer.start()
    try:
        launch.worker(config(store.path), shard=None, claim=True, lease_s=600)
    finally:
        timer.join()
    assert block_bytes(store.path) == reference


def test_blocks_restricts_collect_to_the_given_blocks(store, reference):
    from coarpy.collect import collect

    setup = config(store.path).build()
    args = (setup.model, setup.components, setup.data)
    collect(*args, path=store.path, blocks=[1, 6], progress=False, **SETTINGS)
    assert block_bytes(store.path) == {k: reference[k] for k in ("b000001.blk", "b000006.blk")}
    with pytest.raises(ValueError, match=r"block indices in 0\.\.7"):
        collect(*args, path=store.path, blocks=[8], progress=False, **SETTINGS)


def test_a_worker_leaves_a_heartbeat_that_status_reports(tmp_path):
    run = tmp_path / "run"
    launch.worker(config(run), shard="0/1")
    beat = json.loads((run / "workers" / f"{platform.node()}-{os.getpid()}.json").read_text())
    assert set(beat) == {"host", "pid", "shard", "device", "time", "state"}
    assert (beat["shard"], beat["device"], beat["state"]) == ([0, 1], "cpu", "finished")
    seen = runs.status(run)["workers_recent"]
    assert [(w["host"], w["pid"]) for w in seen] == [(platform.node(), os.getpid())]


def test_a_worker_on_a_run_directory_takes_its_shard_from_slurm_variables(
    tmp_path, reference, monkeypatch
):
    run = tmp_path / "run"
    _empty(run)
    (run / "config.toml").write_text(config(run).to_toml())  # as `coar collect` leaves it
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    launch.worker(run)  # shard="env": task 5 of the array 4..5 is shard 1/2
    assert block_bytes(run) == {k: v for k, v in reference.items() if int(k[1:7]) % 2 == 1}


def test_a_missing_engine_is_named_with_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    with pytest.raises(launch.MissingExtraError, match=r"pip install coarpy\[slurm\]"):
        launch.slurm(config(tmp_path / "run"), n_workers=2)


# -- stores on fsspec filesystems -------------------------------------------------------


def test_a_store_on_an_fsspec_filesystem_holds_the_bytes_of_a_local_one(tmp_path, reference):
    import fsspec

    url = f"memory://coar-test-{tmp_path.name}/run"
    try:
        ds = launch.worker(config(url), shard=None)
        assert block_bytes(url) == reference
        assert len(ds) == 24 and ds.path.url == url
        before = {b: ds.block_path(b).stat().st_mtime for b in ds.done_blocks()}
        launch.worker(config(url), shard=None)  # a resume finds nothing to do
        assert {b: ds.block_path(b).stat().st_mtime for b in ds.done_blocks()} == before
        with pytest.raises(NotImplementedError, match="local directory"):
            ds.consolidate()
    finally:
        fsspec.filesystem("memory").rm(f"/coar-test-{tmp_path.name}", recursive=True)


# -- local launcher -------------------------------------------------------------------


def test_local_launcher_restarts_a_killed_worker_and_matches_an_uninterrupted_run(
    tmp_path, reference
):
    run, marker = tmp_path / "run", tmp_path / "died"
    cfg = config(run, delay=0.02, die_marker=str(marker))
    ds = launch.local(cfg, devices="cpu:2", restarts=1, lease_s=30, poll_s=0.1)
    assert marker.exists()  # one worker was SIGKILLed in the middle of a block
    logs = [p.read_text() for p in sorted((run / "logs").glob("worker-*.log"))]
    assert len(logs) == 2 and sum("start 2" in text for text in logs) == 1
    assert block_bytes(run) == reference
    assert len(ds) == 24
    assert not list((run / "leases").iterdir())  # the dead worker's leases are swept


def test_local_launcher_does_not_restart_a_worker_stopped_by_a_coarpy_error(tmp_path):
    run = tmp_path / "run"
    _empty(run)
    other = dataclasses.replace(config(run), alpha=0.3)  # the store has 0.2
    with pytest.raises(launch.LaunchError, match="StoreMismatchError"):
        launch.local(other, devices="cpu:1", restarts=2, poll_s=0.1)
    assert "start 2" not in (run / "logs" / "worker-0.log").read_text()


def test_plain_collect_then_local_launcher_fill_one_store_identically(tmp_path, reference):
    run = tmp_path / "run"
    launch.worker(config(run), shard="0/2")
    assert 0 < len(block_bytes(run)) < 8
    launch.local(config(run), devices="cpu:1", poll_s=0.1)
    assert block_bytes(run) == reference


# -- SLURM through submitit (its local executor) ----------------------------------------


@pytest.mark.slow
def test_slurm_task_preempted_in_a_block_is_requeued_and_matches(tmp_path, reference):
    submitit = pytest.importorskip("submitit")
    run, marker = tmp_path / "run", tmp_path / "preempted"
    cfg = config(run, delay=0.02, die_marker=str(marker), die_signal="SIGUSR2")
    executor = submitit.LocalExecutor(folder=tmp_path / "slurm")
    jobs = launch.slurm(cfg, n_workers=2, executor=executor, poll_s=0.2, timeout_min=5)
    assert marker.exists()
    logs = "".join(p.read_text() for p in (tmp_path / "slurm").glob("*_log.out"))
    assert "Requeued job" in logs  # submitit's checkpoint and requeue ...
    assert len(list((tmp_path / "slurm").glob("*_submitted.pkl"))) == 2  # ... no resubmission
    assert len(jobs) == 2 and all(job.result() is None for job in jobs)
    assert block_bytes(run) == reference


@pytest.mark.slow
def test_slurm_task_killed_is_resubmitted_and_matches(tmp_path, reference):
    submitit = pytest.importorskip("submitit")
    run, marker = tmp_path / "run", tmp_path / "killed"
    cfg = config(run, delay=0.02, die_marker=str(marker))
    executor = submitit.LocalExecutor(folder=tmp_path / "slurm")
    launch.slurm(cfg, n_workers=2, executor=executor, claim=False, poll_s=0.2, restarts=1)
    assert marker.exists()
    assert block_bytes(run) == reference


# -- Ray ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), *sys.path])  # for the workers
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_replaces_a_killed_actor_reruns_its_block_and_matches(tmp_path, reference, ray_cluster):
    run, marker = tmp_path / "run", tmp_path / "died"
    cfg = config(run, delay=0.02, die_marker=str(marker))
    ds = launch.ray(cfg, restarts=1)
    assert marker.exists()
    assert block_bytes(run) == reference and len(ds) == 24


@pytest.mark.slow
def test_local_then_ray_fill_one_store_identically(tmp_path, reference, ray_cluster):
    run = tmp_path / "run"
    launch.local(config(run, n_masks=12), devices="cpu:1", poll_s=0.1)
    assert len(block_bytes(run)) == 4
    launch.ray(config(run), n_actors=2)
    assert block_bytes(run) == reference
