"""Launchers: however a run is spread over processes, engines and failures, its store
ends up byte for byte equal to the store of one uninterrupted in-process run."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import threading
from pathlib import Path

import pytest

from coarpy import runs
from coarpy.errors import ArgumentError, LaunchError, MissingExtraError
from coarpy.runs import _launching, leases, local, slurm
from coarpy.runs import ray as ray_launcher
from coarpy.runs.config import RunConfig

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from _launch_setup import (  # noqa: E402
    SETTINGS,
    block_bytes,
    config,
    dead_pid,
    empty_store,
    write_lease,
)

sys.path.remove(str(TESTS))


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
    path = tmp_path_factory.mktemp("reference") / "run"
    runs.collect_run(config(path))
    found = block_bytes(path)
    assert len(found) == 8
    return found


@pytest.fixture
def store(tmp_path, reference):
    """An empty store of the reference settings (meta.json only)."""
    return empty_store(tmp_path / "run")


# -- devices ------------------------------------------------------------------------


def test_parse_devices_gives_one_entry_per_worker():
    assert local.parse_devices(["cuda:1", "cpu:2"]) == ["cuda:1", "cpu", "cpu"]
    assert local.parse_devices("cpu") == ["cpu"]


@pytest.mark.parametrize("bad", ["gpu:0", "cuda", "cpu:0", "cpu:x", ""])
def test_parse_devices_rejects_other_spellings(bad):
    with pytest.raises(ArgumentError, match="cuda:INDEX|names no device"):
        local.parse_devices(bad)


def test_a_gpu_worker_sees_only_its_gpu_numbered_as_the_parent_sees_it(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    env, device = local._child_env("cuda:1", threads=3)
    assert (env["CUDA_VISIBLE_DEVICES"], device, env["OMP_NUM_THREADS"]) == ("6", "cuda:0", "3")
    env, device = local._child_env("cpu", threads=1)
    assert (env["CUDA_VISIBLE_DEVICES"], device) == ("", "cpu")
    with pytest.raises(ArgumentError, match="not visible"):
        local._child_env("cuda:2", threads=1)


def test_workers_elsewhere_get_an_absolute_store_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sent = RunConfig.from_text(_launching.portable(config("runs/x")))
    assert sent.path == str(tmp_path / "runs" / "x")
    assert RunConfig.from_text(_launching.portable(config("s3://b/x"))).path == "s3://b/x"


# -- collect: claim mode, blocks, heartbeats -------------------------------------------


def test_claim_mode_alone_fills_the_store_of_a_plain_run(tmp_path, reference):
    run = tmp_path / "run"
    runs.collect_run(config(run), shard="1/3", claim=True)
    assert block_bytes(run) == reference
    assert not list((run / "leases").iterdir())


def test_claim_mode_takes_over_the_blocks_of_a_dead_worker(store, reference):
    for b in (0, 2, 5):
        write_lease(store, b, host=platform.node(), pid=dead_pid())
    runs.collect_run(config(store.path), shard="0/2", claim=True)
    assert block_bytes(store.path) == reference


def test_claim_mode_waits_for_a_block_a_live_worker_holds_then_takes_it_when_freed(
    store, reference
):
    other = leases.Claims(store, [6], lease_s=600).__enter__()
    assert other.acquire(6)
    timer = threading.Timer(1.0, other.__exit__, (None, None, None))  # gives up unfinished
    timer.start()
    try:
        runs.collect_run(config(store.path), shard=None, claim=True, lease_s=600)
    finally:
        timer.join()
    assert block_bytes(store.path) == reference


def test_blocks_restricts_collect_to_the_given_blocks(store, reference):
    from coarpy.collect import collect

    setup = config(store.path).build()
    args = (setup.model, setup.components, setup.data)
    collect(*args, path=store.path, blocks=[1, 6], progress=False, **SETTINGS)
    assert block_bytes(store.path) == {k: reference[k] for k in ("b000001.blk", "b000006.blk")}
    with pytest.raises(ArgumentError, match=r"block indices in 0\.\.7"):
        collect(*args, path=store.path, blocks=[8], progress=False, **SETTINGS)


def test_a_worker_leaves_a_heartbeat_that_status_reports(tmp_path):
    run = tmp_path / "run"
    runs.collect_run(config(run), shard="0/1")
    beat = json.loads((run / "workers" / f"{platform.node()}-{os.getpid()}.json").read_text())
    assert set(beat) == {"host", "pid", "shard", "device", "time", "state", "progress_s"}
    assert (beat["shard"], beat["device"], beat["state"]) == ([0, 1], "cpu", "finished")
    seen = runs.status(run)["workers_recent"]
    assert [(w["host"], w["pid"]) for w in seen] == [(platform.node(), os.getpid())]


def test_a_worker_on_a_run_directory_takes_its_shard_from_slurm_variables(
    tmp_path, reference, monkeypatch
):
    run = tmp_path / "run"
    empty_store(run)
    (run / "config.toml").write_text(config(run).to_toml())  # as `coar collect` leaves it
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    runs.collect_run(run, shard="env")  # task 5 of the array 4..5 is shard 1/2
    assert block_bytes(run) == {k: v for k, v in reference.items() if int(k[1:7]) % 2 == 1}


def test_a_missing_engine_is_named_with_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install coarpy\[slurm\]"):
        slurm.launch(config(tmp_path / "run"), n_workers=2)


# -- stores on fsspec filesystems -------------------------------------------------------


def test_a_store_on_an_fsspec_filesystem_holds_the_bytes_of_a_local_one(tmp_path, reference):
    import fsspec

    url = f"memory://coar-test-{tmp_path.name}/run"
    try:
        ds = runs.collect_run(config(url), shard=None)
        assert block_bytes(url) == reference
        assert len(ds) == 24 and ds.path.url == url
        before = {b: ds.block_path(b).stat().st_mtime for b in ds.done_blocks()}
        runs.collect_run(config(url), shard=None)  # a resume finds nothing to do
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
    ds = local.launch(cfg, devices="cpu:2", restarts=1, lease_s=30, poll_s=0.1)
    assert marker.exists()  # one worker was SIGKILLed in the middle of a block
    logs = [p.read_text() for p in sorted((run / "logs").glob("worker-*.log"))]
    assert len(logs) == 2 and sum("start 2" in text for text in logs) == 1
    assert block_bytes(run) == reference
    assert len(ds) == 24
    assert not list((run / "leases").iterdir())  # the dead worker's leases are swept


def test_local_launcher_does_not_restart_a_worker_stopped_by_a_coarpy_error(tmp_path):
    run = tmp_path / "run"
    empty_store(run)
    other = dataclasses.replace(config(run), alpha=0.3)  # the store has 0.2
    with pytest.raises(LaunchError, match="StoreMismatchError"):
        local.launch(other, devices="cpu:1", restarts=2, poll_s=0.1)
    assert "start 2" not in (run / "logs" / "worker-0.log").read_text()


def test_local_launcher_workers_keep_the_configurations_prefix(tmp_path):
    """Regression: launched workers once dropped ``prefix`` (and ``compile_model``), so
    a bad cut went unnoticed; now the worker checks it and stops with its SplitError."""
    cfg = dataclasses.replace(config(tmp_path / "run"), prefix="9")  # no module 9
    with pytest.raises(LaunchError, match="SplitError"):
        local.launch(cfg, devices="cpu:1", restarts=0, poll_s=0.1)


def test_plain_collect_then_local_launcher_fill_one_store_identically(tmp_path, reference):
    run = tmp_path / "run"
    runs.collect_run(config(run), shard="0/2")
    assert 0 < len(block_bytes(run)) < 8
    local.launch(config(run), devices="cpu:1", poll_s=0.1)
    assert block_bytes(run) == reference


# -- SLURM through submitit (its local executor) ----------------------------------------


@pytest.mark.slow
def test_slurm_task_preempted_in_a_block_is_requeued_and_matches(tmp_path, reference):
    submitit = pytest.importorskip("submitit")
    run, marker = tmp_path / "run", tmp_path / "preempted"
    cfg = config(run, delay=0.02, die_marker=str(marker), die_signal="SIGUSR2")
    executor = submitit.LocalExecutor(folder=tmp_path / "slurm")
    ds = slurm.launch(cfg, n_workers=2, executor=executor, poll_s=0.2, timeout_min=5)
    assert marker.exists()
    logs = "".join(p.read_text() for p in (tmp_path / "slurm").glob("*_log.out"))
    assert "Requeued job" in logs  # submitit's checkpoint and requeue ...
    assert len(list((tmp_path / "slurm").glob("*_submitted.pkl"))) == 2  # ... no resubmission
    assert block_bytes(run) == reference and len(ds) == 24


@pytest.mark.slow
def test_slurm_task_killed_is_resubmitted_and_matches(tmp_path, reference):
    submitit = pytest.importorskip("submitit")
    run, marker = tmp_path / "run", tmp_path / "killed"
    cfg = config(run, delay=0.02, die_marker=str(marker))
    executor = submitit.LocalExecutor(folder=tmp_path / "slurm")
    slurm.launch(cfg, n_workers=2, executor=executor, claim=False, poll_s=0.2, restarts=1)
    assert marker.exists()
    assert block_bytes(run) == reference


# -- Ray ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), *sys.path])  # for the workers
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    for key, value in saved.items():  # later tests see the environment they started with
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.slow
def test_ray_replaces_a_killed_actor_reruns_its_block_and_matches(tmp_path, reference, ray_cluster):
    run, marker = tmp_path / "run", tmp_path / "died"
    cfg = config(run, delay=0.02, die_marker=str(marker))
    ds = ray_launcher.launch(cfg, restarts=1)
    assert marker.exists()
    assert block_bytes(run) == reference and len(ds) == 24


@pytest.mark.slow
def test_local_then_ray_fill_one_store_identically(tmp_path, reference, ray_cluster):
    run = tmp_path / "run"
    local.launch(config(run, n_masks=12), devices="cpu:1", poll_s=0.1)
    assert len(block_bytes(run)) == 4
    ray_launcher.launch(config(run), n_workers=2)
    assert block_bytes(run) == reference
