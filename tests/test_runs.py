"""Run directories (coarpy.runs): the one config loader, the one config -> collect path,
shards from the environment, heartbeats and status."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import pytest

from coarpy import runs
from coarpy.collect import collect
from coarpy.errors import ArgumentError, ConfigError, SplitError
from coarpy.runs import RunConfig, heartbeat
from coarpy.store import ComponentDataset

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from _launch_setup import SETTINGS, config, setup  # noqa: E402

sys.path.remove(str(TESTS))


@pytest.fixture
def clean_env(monkeypatch):
    for var in (
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "RANK",
        "WORLD_SIZE",
    ):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of 6 blocks of 50 masks, collected in this process."""
    run = tmp_path_factory.mktemp("status") / "run"
    runs.collect_run(dataclasses.replace(config(run, n_masks=300), block_size=50), progress=False)
    return run


def memory_url(tmp_path: Path, name: str) -> str:
    return f"memory://coar-runs-{tmp_path.name}/{name}"


@pytest.fixture
def memory(tmp_path):
    """Removes this test's folder of fsspec's in-memory filesystem afterwards."""
    fsspec = pytest.importorskip("fsspec")
    yield
    fsspec.filesystem("memory").rm(f"/coar-runs-{tmp_path.name}", recursive=True)


# -- the one config loader ----------------------------------------------------------------


def test_load_config_reads_a_file_a_run_directory_or_a_config_itself(tmp_path):
    cfg = config(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text(cfg.to_toml())
    (tmp_path / "run.toml").write_text(cfg.to_toml())
    assert runs.load_config(tmp_path / "run.toml") == cfg
    assert runs.load_config(tmp_path / "run") == cfg
    assert runs.load_config(str(tmp_path / "run")) == cfg
    assert runs.load_config(cfg) is cfg
    assert RunConfig.load(tmp_path / "run") == cfg


def test_load_config_reads_a_run_on_an_fsspec_filesystem(tmp_path, memory):
    url = memory_url(tmp_path, "run")
    cfg = config(url)
    runs.save_config(cfg)
    assert runs.load_config(url) == cfg
    assert runs.load_config(f"{url}/config.toml") == cfg
    assert not (Path.cwd() / "memory:").exists()


def test_load_config_says_what_is_missing(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=r"has no config.toml\. Runs started from Python"):
        runs.load_config(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"No run configuration at .*nowhere.toml\. Pass a TOML"):
        runs.load_config(tmp_path / "nowhere.toml")
    (tmp_path / "bad.toml").write_text("factory = \n")
    with pytest.raises(ConfigError, match=r"bad.toml is not valid TOML"):
        runs.load_config(tmp_path / "bad.toml")


def test_save_config_writes_once_and_leaves_an_identical_file_alone(tmp_path):
    cfg = config(tmp_path / "run")
    runs.save_config(cfg)
    saved = tmp_path / "run" / "config.toml"
    then = time.time() - 100
    os.utime(saved, (then, then))
    runs.save_config(cfg)
    assert saved.stat().st_mtime == pytest.approx(then)
    runs.save_config(dataclasses.replace(cfg, seed=9))
    assert runs.load_config(tmp_path / "run").seed == 9


def test_every_field_round_trips_through_toml_exactly():
    """Written by tomli-w, read by tomllib: awkward strings, tuples, floats and nested
    factory arguments come back equal."""
    cfg = RunConfig(
        factory="my pkg.mod:build",
        path='runs/a "quoted" \\ path\twith tab',
        n_masks=7,
        alpha=0.1 + 0.2,  # 0.30000000000000004 must come back bit for bit
        seed=3,
        sampler="exact",
        block_size=5,
        batch_size=4,
        device="cpu",
        output="margin",
        kinds=("heads", "neurons"),
        include=("encoder.*",),
        exclude=("*.out", "pooler*"),
        components=None,
        autocast="bf16",
        dtype="float16",
        prefix="é/ü",
        compile_model=True,
        factory_args={"n": 2, "x": 1e-300, "names": ["a", "b"], "more": {"deep key": True}},
    )
    assert RunConfig.from_text(cfg.to_toml()) == cfg
    spec = dataclasses.replace(cfg, kinds=None, components={"encoder.layer.0": "heads"})
    assert RunConfig.from_text(spec.to_toml()) == spec


def test_a_factory_argument_toml_cannot_hold_is_a_config_error():
    cfg = dataclasses.replace(config("x"), factory_args={"missing": None})
    with pytest.raises(ConfigError, match="factory_args may hold"):
        cfg.to_toml()


# -- the one config -> collect path ------------------------------------------------------


def test_every_config_field_that_collect_takes_is_passed_to_it():
    """Regression: the launchers' copy of this mapping dropped prefix and compile_model."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    takes = set(inspect.signature(collect).parameters)
    settings = runs.collect_settings(config("x"), "margin")
    built = {"components"}  # a spec that RunConfig.build turns into the positional argument
    assert (fields & takes) - built - set(settings) == set()
    assert set(settings) <= takes


def test_collect_run_compiles_the_model_when_the_config_says_so(tmp_path, monkeypatch):
    import torch

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    cfg = dataclasses.replace(config(tmp_path / "run", n_masks=3), compile_model=True)
    runs.collect_run(cfg, progress=False)
    assert len(compiled) == 1


def test_collect_run_uses_the_configurations_prefix(tmp_path):
    cfg = dataclasses.replace(config(tmp_path / "run", n_masks=3), prefix="9")
    with pytest.raises(SplitError, match="Cannot cut the model at '9'"):
        runs.collect_run(cfg, progress=False)


def test_collect_run_on_a_url_fills_the_store_there(tmp_path, memory, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = memory_url(tmp_path, "run")
    ds = runs.collect_run(config(url), progress=False)
    assert str(ds.path) == url and ds.missing_blocks() == []
    assert runs.load_config(url) == config(url)
    assert runs.status(url)["done_blocks"] == 8
    assert not (tmp_path / "memory:").exists()


def test_fit_on_a_url_says_it_needs_a_local_directory(tmp_path):
    with pytest.raises(ConfigError, match="needs a local directory"):
        runs.fit_run(memory_url(tmp_path, "run"))


# -- shards from the environment -----------------------------------------------------------


def test_shard_from_torchrun_variables(clean_env, tmp_path):
    assert runs.shard_from_env() is None
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "3")
    assert runs.shard_from_env() == (1, 3)
    ds = runs.collect_run(config(tmp_path / "run"), shard="env", progress=False)
    assert ds.done_blocks() == [1, 4, 7]


def test_shard_from_slurm_array_variables(clean_env):
    clean_env.setenv("SLURM_ARRAY_TASK_ID", "5")
    clean_env.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    clean_env.setenv("SLURM_ARRAY_TASK_MIN", "4")
    clean_env.setenv("RANK", "0")  # SLURM's array variables come first
    clean_env.setenv("WORLD_SIZE", "8")
    assert runs.shard_from_env() == (1, 2)


def test_shard_env_without_variables_means_every_block(clean_env):
    assert runs.parse_shard("env") is None


@pytest.mark.parametrize(
    ("shard", "match"),
    [
        ((2, 2), r"shard must be \(k, K\) with 0 <= k < K, got \(2, 2\)"),
        ("1/0", r"0 <= k < K, got \(1, 0\)"),
        ("first/2", r"shard must be 'k/K'.*got 'first/2'"),
        ("3", r"shard must be 'k/K'.*got '3'"),
    ],
)
def test_bad_shards_are_refused(shard, match):
    with pytest.raises(ArgumentError, match=match):
        runs.parse_shard(shard)


# -- heartbeats ----------------------------------------------------------------------------


def test_a_heartbeat_says_collecting_until_the_blocks_run_out(tmp_path):
    beat = heartbeat.Heartbeat(tmp_path, shard=(1, 4), device="cuda:0")
    states = []
    for _ in beat.around([5, 9]):
        states.append(json.loads(beat.path.read_text())["state"])
    final = json.loads(beat.path.read_text())
    assert beat.path.name == f"{platform.node()}-{os.getpid()}.json"
    assert states == ["collecting", "collecting"] and final["state"] == "finished"
    assert (final["shard"], final["device"]) == ([1, 4], "cuda:0")


# -- status ----------------------------------------------------------------------------------


def _copy(run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "store"
    shutil.copytree(run, folder)
    return folder


def test_status_speed_counts_recent_blocks_only_after_a_pause(finished, tmp_path):
    folder = _copy(finished, tmp_path)
    ds = ComponentDataset(folder)
    now = time.time()
    # Block 0 a day ago, then blocks 1..5 ten seconds apart ending now (50 rows each).
    stamps = [now - 86400] + [now - 10 * (5 - b) for b in range(1, 6)]
    for b, t in enumerate(stamps):
        os.utime(ds.block_path(b), (t, t))
    info = runs.status(folder)
    # Blocks 2..5 finished in the 40 s after block 1: 200 rows / 40 s.
    assert info["masks_per_s"] == pytest.approx(5.0, rel=1e-6)
    assert info["eta_s"] == 0.0
    assert "speed      5.00 masks/s, ETA done" in runs.format_status(info)


def test_status_lists_workers_whose_heartbeat_is_recent(finished, tmp_path):
    folder = _copy(finished, tmp_path)
    beats = folder / runs.WORKERS
    shutil.rmtree(beats)  # the collecting worker's own heartbeat: start from none
    assert runs.status(folder)["workers_recent"] is None  # no worker wrote a heartbeat
    assert "\nworkers " not in runs.format_status(runs.status(folder))
    beats.mkdir()
    now = time.time()
    (beats / "gpu1-11.json").write_text(
        json.dumps({"host": "gpu1", "pid": 11, "shard": [0, 2], "time": now - 5})
    )
    (beats / "gpu2-12.json").write_text(
        json.dumps({"host": "gpu2", "pid": 12, "shard": [1, 2], "time": now - 3600})
    )
    (beats / "partial.json").write_text('{"host": "gp')
    info = runs.status(folder)
    assert [(w["host"], w["pid"], w["shard"]) for w in info["workers_recent"]] == [
        ("gpu1", 11, [0, 2])
    ]
    assert "workers    1 seen in the last 5 min: gpu1:11 (shard 0/2)" in runs.format_status(info)
    json.dumps(info)  # `coar status --json` prints it


def test_status_of_a_finished_run_says_what_exists(finished):
    info = runs.status(finished)
    assert (info["done_blocks"], info["n_blocks"], info["fraction"]) == (6, 6, 1.0)
    assert (info["fitted"], info["evaluated"]) == (False, False)
    assert info["settings"]["n_components"] == 14


# -- launching ------------------------------------------------------------------------------


def test_launch_names_the_options_of_each_launcher(tmp_path):
    cfg = config(tmp_path / "run")
    with pytest.raises(ArgumentError, match="launcher must be one of local, slurm, ray"):
        runs.launch(cfg, "k8s")
    with pytest.raises(ArgumentError, match="one worker per device"):
        runs.launch(cfg, "local", n_workers=2)
    with pytest.raises(ArgumentError, match="devices='cuda:0' is for the local launcher"):
        runs.launch(cfg, "ray", devices="cuda:0")


# -- liveness and configuration at the door (issue #16) -----------------------------------


def _beat(folder: Path, name: str, **fields) -> None:
    (folder / f"{name}.json").write_text(json.dumps(fields))


def test_status_shows_dead_stalled_finished_and_active_workers(finished, tmp_path):
    from _launch_setup import dead_pid

    folder = _copy(finished, tmp_path)
    beats = folder / runs.WORKERS
    shutil.rmtree(beats)
    beats.mkdir()
    now, here = time.time(), platform.node()
    _beat(beats, "a", host="gpu1", pid=1, shard=[0, 4], time=now - 2, state="collecting")
    _beat(beats, "b", host="gpu2", pid=2, shard=[1, 4], time=now - 120, state="collecting")
    _beat(beats, "c", host=here, pid=dead_pid(), shard=[2, 4], time=now - 1, state="collecting")
    _beat(beats, "d", host="gpu4", pid=4, shard=[3, 4], time=now - 1, state="collecting",
          progress_s=5000.0)  # fmt: skip
    _beat(beats, "e", host="gpu5", pid=5, shard=None, time=now - 100, state="finished")
    info = runs.status(folder)
    states = {w["host"]: w["state"] for w in info["workers_recent"]}
    assert states == {"gpu1": "active", "gpu2": "dead", here: "dead", "gpu4": "stalled",
                      "gpu5": "finished"}  # fmt: skip
    text = runs.format_status(info)
    assert "gpu2:2 (shard 1/4) dead" in text and "3 dead or stalled" in text


def test_a_collecting_worker_beats_between_blocks(tmp_path):
    beat = heartbeat.Heartbeat(tmp_path, beat_s=0.05)
    seen = []
    for _ in beat.around([0]):  # one long block: the thread beats while it runs
        first = json.loads(beat.path.read_text())["time"]
        time.sleep(0.4)
        seen.append(json.loads(beat.path.read_text())["time"] - first)
    assert seen[0] > 0.1


def test_old_heartbeats_of_dead_and_finished_workers_are_swept(tmp_path):
    beats = tmp_path / runs.WORKERS
    beats.mkdir()
    old = time.time() - 2 * heartbeat.SWEEP_S
    _beat(beats, "gone", host="gpu1", pid=1, time=old, state="collecting")
    _beat(beats, "done", host="gpu2", pid=2, time=old, state="finished")
    _beat(beats, "now", host="gpu3", pid=3, time=time.time(), state="collecting")
    assert heartbeat.sweep(tmp_path) == 2
    assert [p.name for p in beats.iterdir()] == ["now.json"]


def test_a_first_collect_killed_before_any_block_resumes_from_its_run_directory(
    tmp_path, monkeypatch
):
    run = tmp_path / "run"
    cfg = config(run)

    def killed(self):
        raise KeyboardInterrupt  # the process dies while building the model

    monkeypatch.setattr(RunConfig, "build", killed)
    with pytest.raises(KeyboardInterrupt):
        runs.collect_run(cfg, progress=False)
    monkeypatch.undo()
    assert RunConfig.load(run) == cfg  # written first, whole
    ds = runs.collect_run(run, progress=False)  # what `coar worker RUN` does
    assert len(ds) == cfg.n_masks


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("alpha", 1.5, r"alpha is the fraction of components ablated .* got 1.5"),
        ("n_masks", 0, r"n_masks must be >= 1, got 0"),
        ("seed", -1, r"seed must be >= 0, got -1"),
        ("block_size", -2, r"block_size must be >= 1"),
        ("batch_size", 0, r"batch_size must be >= 1, got 0"),
        ("batch_size", 2.5, r"batch_size must be an integer, got 2.5"),
        ("sampler", "sobol", r"sampler must be one of \('bernoulli', 'exact'\)"),
        ("dtype", "int8", r"dtype must be one of"),
        ("autocast", "fp8", r"autocast must be one of \('bf16', 'fp16'\)"),
        ("mode", "mean", r"mode must be 'zero' in a run configuration"),
        ("factory", "nocolon", r"factory must be 'package.module:function'"),
        ("device", "gpu0", r"device 'gpu0' is not a device torch knows"),
        ("kinds", "conv", r"kinds must be a list of strings"),
        ("components", {"a": 1}, r"components must be a table of module = kind"),
        ("compile_model", "yes", r"compile_model must be True or False"),
        ("factory_args", [1], r"factory_args must be a mapping"),
    ],
)
def test_every_config_field_is_checked_when_read(tmp_path, field, value, match):
    raw = {"factory": "m:f", "path": str(tmp_path / "run"), "n_masks": 4, "alpha": 0.1}
    raw[field] = value
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(raw, where="run.toml")
    with pytest.raises(ConfigError, match=r"run.toml: "):
        RunConfig.from_dict(raw, where="run.toml")
    assert not (tmp_path / "run").exists()


def test_a_factory_that_raises_on_import_or_takes_other_arguments_is_a_config_error(
    tmp_path, monkeypatch
):
    (tmp_path / "broken_factory.py").write_text("1 / 0\n")
    (tmp_path / "strict_factory.py").write_text("def make(width):\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = {"path": str(tmp_path / "run"), "n_masks": 4, "alpha": 0.1}
    with pytest.raises(ConfigError, match=r"importing it raised ZeroDivisionError"):
        RunConfig(factory="broken_factory:make", **base).build()
    with pytest.raises(ConfigError, match=r"\[factory_args\] \['depth'\] do not fit"):
        RunConfig(factory="strict_factory:make", factory_args={"depth": 2}, **base).build()


def test_a_claiming_worker_of_a_smaller_run_takes_only_its_own_blocks_of_a_grown_store(
    tmp_path,
):
    """A worker started with the smaller n_masks after another grew the store fills its
    own blocks and leaves the rest (it once claimed a block past its own count and
    stopped with an ArgumentError: the workers campaign hit this under load)."""
    from coarpy.collect import collect

    made = setup()
    grown = {**SETTINGS, "n_masks": 2 * SETTINGS["n_masks"]}
    collect(made["model"], made["components"], made["data"], path=tmp_path / "run",
            blocks=[], progress=False, **grown)  # fmt: skip
    ds = runs.collect_run(config(tmp_path / "run"), claim=True, progress=False)
    n_small = SETTINGS["n_masks"] // SETTINGS["block_size"]
    assert ComponentDataset(ds.path).n_blocks == 2 * n_small  # the growth is kept
    assert ComponentDataset(ds.path).missing_blocks() == list(range(n_small, 2 * n_small))
