"""Launchers: collection on many devices and machines, on engines that already exist.

Every launcher runs the same worker (``worker``: ``collect`` on a run configuration),
and the store does the coordinating. A block is done iff its file exists, so workers
skip finished blocks, a killed worker loses only the blocks it was computing, and any
mix of launchers, one after another or at the same time, fills one store with the
same bytes as a single uninterrupted run.

- ``worker``: this process; its shard ``k/K``, or (``claim=True``) any block no live
  worker holds, through lease files (``coarpy._leases``).
- ``local``: one process per device on this machine; a dead one is restarted.
- ``slurm``: a submitit job array over shards; a task is requeued on preemption or
  timeout (submitit's checkpoint), and a crashed one is resubmitted.
- ``ray``: one actor per GPU that loads the model once; blocks go to idle actors,
  and a dead actor is replaced and its block run again.

Errors coarpy raises on purpose (a bad configuration, a mismatched store, a failing
block) stop a launch at once; crashes, kills and preemptions are retried.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _fs
from ._leases import LEASE_S
from .config import ConfigError, RunConfig
from .errors import CoarError, LaunchError, MissingExtraError
from .store import ComponentDataset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

CONFIG = "config.toml"
LOGS = "logs"
_USER_ERROR = 2  # a worker's exit status for a CoarError: restarting would fail again


# -- configurations ------------------------------------------------------------------


def _config(run: RunConfig | str | os.PathLike) -> RunConfig:
    """A run configuration, from itself, a TOML file, or a run directory holding one."""
    if isinstance(run, RunConfig):
        return run
    where = _fs.path(run)
    if where.is_dir():
        where = where / CONFIG
    try:
        text = where.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"No run configuration at {where}. Pass a TOML configuration file, a run "
            "directory made by `coar collect CONFIG`, or a coarpy.config.RunConfig."
        ) from None
    return _config_from_text(text, where=str(where))


def _config_from_text(text: str, *, where: str = "config") -> RunConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where} is not valid TOML: {err}") from err
    return RunConfig.from_dict(raw, where=where)


def _portable(cfg: RunConfig) -> str:
    """The configuration as TOML for workers that may start in another directory
    (SLURM tasks, Ray actors): a relative store path is made absolute. Paths inside
    ``factory_args`` are the factory's business: make them absolute in the file."""
    if not _fs.is_url(cfg.path) and not Path(cfg.path).is_absolute():
        cfg = dataclasses.replace(cfg, path=str(Path(cfg.path).resolve()))
    return cfg.to_toml()


def _save_config(cfg: RunConfig) -> None:
    """Keep the configuration next to the run (``RUN/config.toml``), as collect_run does.

    Workers finishing together write the same text; each write is atomic.
    """
    run = _fs.path(cfg.path)
    run.mkdir(parents=True, exist_ok=True)
    target = run / CONFIG
    text = cfg.to_toml()
    try:
        if target.read_text() == text:
            return
    except FileNotFoundError:
        pass
    _fs.atomic_write(target, text.encode())


# -- one worker ----------------------------------------------------------------------


def worker(
    run: RunConfig | str | os.PathLike,
    *,
    shard: tuple[int, int] | str | None = "env",
    claim: bool = False,
    lease_s: float = LEASE_S,
    device: str | None = None,
    progress: bool | None = None,
) -> ComponentDataset:
    """Collect this worker's part of a run in this process; return the store.

    Parameters
    ----------
    run : a ``RunConfig``, a TOML configuration file, or a run directory.
    shard : ``(k, K)``, ``"k/K"``, ``"env"`` (SLURM_ARRAY_TASK_ID/COUNT or
        RANK/WORLD_SIZE when set, else every block) or None (every block).
    claim : also take other workers' unfinished blocks through lease files, and
        return only when the whole run is done (see ``coarpy.collect``).
    lease_s : seconds after which a lease nobody renews counts as dead.
    device : run here instead of the configuration's device (the saved
        configuration keeps its own).
    """
    from .collect import collect

    cfg = _config(run)
    local_cfg = cfg if device is None else dataclasses.replace(cfg, device=device)
    setup = local_cfg.build()
    ds = collect(
        setup.model,
        setup.components,
        setup.data,
        **_collect_settings(local_cfg, setup.output),
        shard=shard,
        claim=claim,
        lease_s=lease_s,
        progress=progress,
    )
    _save_config(cfg)  # after collect: a configuration the store refused is not kept
    return ds


def _collect_settings(cfg: RunConfig, output: Any) -> dict[str, Any]:
    """The ``collect`` arguments a configuration fixes (as ``runs.collect_run`` passes them)."""
    return {
        "output": output,
        "path": cfg.path,
        "n_masks": cfg.n_masks,
        "alpha": cfg.alpha,
        "seed": cfg.seed,
        "sampler": cfg.sampler,
        "block_size": cfg.block_size,
        "batch_size": cfg.batch_size,
        "device": cfg.device,
        "mode": cfg.mode,
        "autocast": cfg.autocast,
        "dtype": cfg.dtype,
    }


# -- local processes -----------------------------------------------------------------


def parse_devices(devices: str | Sequence[str]) -> list[str]:
    """One entry per worker: ``"cuda:0,cuda:1"`` -> two GPUs; ``"cpu:2"`` -> two CPU workers.

    Examples
    --------
    >>> parse_devices("cpu:2")
    ['cpu', 'cpu']
    >>> parse_devices("cuda:0,cuda:3")
    ['cuda:0', 'cuda:3']
    """
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    out: list[str] = []
    for item in (str(i).strip() for i in items):
        kind, _, number = item.partition(":")
        if kind == "cpu" and (not number or number.isdigit()) and number != "0":
            out += ["cpu"] * int(number or 1)
        elif kind == "cuda" and number.isdigit():
            out.append(f"cuda:{int(number)}")
        else:
            raise ValueError(
                f"devices must list cuda:INDEX entries or cpu:N (N CPU workers), separated "
                f"by commas, e.g. 'cuda:0,cuda:1' or 'cpu:2'; got {item!r} in {devices!r}."
            )
    if not out:
        raise ValueError(f"devices names no device: {devices!r}. Use e.g. 'cpu:2' or 'cuda:0'.")
    return out


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _child_env(device: str, threads: int) -> tuple[dict[str, str], str]:
    """The environment of a worker process and the device it names inside it.

    The GPU is pinned with CUDA_VISIBLE_DEVICES before the child imports torch, so the
    child sees exactly one GPU, ``cuda:0``; indices follow the parent's visible list.
    """
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        return env, "cpu"
    index = int(device.split(":")[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",") if visible else [str(i) for i in range(index + 1)]
    if index >= len(physical):
        raise ValueError(
            f"{device} is not visible: CUDA_VISIBLE_DEVICES={visible!r} lists "
            f"{len(physical)} device(s). Name a visible index."
        )
    env["CUDA_VISIBLE_DEVICES"] = physical[index].strip()
    return env, "cuda:0"


@dataclasses.dataclass
class _Slot:
    """One worker process of ``local`` and its history."""

    index: int
    device: str
    log: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    exit_codes: list[int] = dataclasses.field(default_factory=list)
    done: bool = False


def local(
    run: RunConfig | str | os.PathLike,
    *,
    devices: str | Sequence[str] = "cpu:1",
    restarts: int = 2,
    claim: bool = True,
    lease_s: float = LEASE_S,
    threads: int | None = None,
    progress: bool | None = None,
    poll_s: float = 0.5,
) -> ComponentDataset:
    """Collect a run with one worker process per device on this machine.

    Worker k of K takes shard k/K first and, with ``claim`` (the default), then any
    block no live worker holds, so fast devices do more. A worker that dies (killed,
    crashed, out of memory) is started again, up to ``restarts`` times; one that stops
    with a coarpy error (bad configuration, mismatched store) is not. Each worker
    logs to ``RUN/logs/worker-k.log``; this process shows one progress bar, read from
    the store.

    Parameters
    ----------
    run : a ``RunConfig``, a TOML configuration file, or a run directory.
    devices : ``"cuda:0,cuda:1"`` (one worker per GPU; each sees only its GPU) or
        ``"cpu:N"`` (N CPU workers sharing this machine's cores), or a list of these.
    restarts : how many times each worker may be restarted.
    claim : dynamic claiming of blocks (lease files); False keeps static shards.
    lease_s : seconds after which an unrenewed lease counts as dead.
    threads : torch threads per worker (default: this machine's cores divided by the
        number of workers, so that the workers never oversubscribe it).
    progress : show the progress bar (default: when stderr is a terminal).
    poll_s : seconds between looks at the workers and the store.

    Returns
    -------
    The finished ``ComponentDataset``.

    Raises
    ------
    LaunchError : workers failed for good and blocks are still missing; the message
        names them, their exit codes and the end of their logs.
    """
    cfg = _config(run)
    slots_devices = parse_devices(devices)
    if restarts < 0:
        raise ValueError(f"restarts must be >= 0, got {restarts}.")
    logs = _log_dir(cfg)
    n = len(slots_devices)
    if threads is None:
        threads = max(1, _cores() // n)
    elif threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}.")
    slots = [_Slot(k, dev, logs / f"worker-{k}.log") for k, dev in enumerate(slots_devices)]
    text = cfg.to_toml()

    def start(slot: _Slot) -> None:
        env, inside = _child_env(slot.device, threads)
        spec = {
            "config": text,
            "shard": [slot.index, n],
            "claim": claim,
            "lease_s": lease_s,
            "device": inside,
            "threads": threads,
        }
        slot.starts += 1
        with open(slot.log, "a") as out:
            out.write(f"--- coar worker {slot.index}/{n} on {slot.device}, start {slot.starts}\n")
            out.flush()
            slot.proc = subprocess.Popen(
                [sys.executable, "-m", "coarpy.launch", json.dumps(spec)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    bar = _StoreBar(cfg.path, progress)
    try:
        for slot in slots:
            start(slot)
        while not all(s.done for s in slots):
            time.sleep(poll_s)
            for slot in slots:
                if slot.done or slot.proc is None or slot.proc.poll() is None:
                    continue
                code = slot.proc.returncode
                slot.exit_codes.append(code)
                if code == 0 or code == _USER_ERROR or slot.starts > restarts:
                    slot.done = True
                    continue
                log.warning(
                    "worker %d on %s exited with %s; restarting it (%d of %d restarts), log: %s",
                    slot.index, slot.device, _describe(code), slot.starts, restarts, slot.log,
                )  # fmt: skip
                start(slot)
            bar.update()
        bar.update()
    finally:
        bar.close()
        _stop(slots)
    return _finished(cfg, slots)


def _log_dir(cfg: RunConfig) -> Path:
    run = _fs.path(cfg.path)
    # worker logs are local files: next to a local store, else in the working directory
    folder = Path.cwd() / "coar-logs" / run.name if _fs.is_remote(run) else run / LOGS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def _stop(slots: list[_Slot]) -> None:
    """Terminate workers still running (after an error or Ctrl-C in this process)."""
    live = [s.proc for s in slots if s.proc is not None and s.proc.poll() is None]
    for proc in live:
        proc.terminate()
    for proc in live:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _finished(cfg: RunConfig, slots: list[_Slot]) -> ComponentDataset:
    """The store if every block is done; else a LaunchError that says why not."""
    failed = [s for s in slots if s.exit_codes and s.exit_codes[-1] != 0]
    try:
        ds = ComponentDataset(cfg.path)
        missing = ds.missing_blocks()
    except FileNotFoundError:
        ds, missing = None, ["all"]
    if ds is not None and not missing:
        for s in failed:
            log.warning(
                "worker %d failed for good (%s) but the others finished its blocks",
                s.index,
                ", ".join(_describe(c) for c in s.exit_codes),
            )
        return ds
    lines = [
        f"worker {s.index} on {s.device}: {', '.join(_describe(c) for c in s.exit_codes)}; "
        f"log {s.log}:\n{_tail(s.log)}"
        for s in failed
    ]
    raise LaunchError(
        f"{cfg.path}: {len(missing)} block(s) still missing after the workers stopped.\n"
        + "\n".join(lines)
        + "\nFix the cause shown in the logs and launch again: finished blocks are kept."
    )


def _tail(path: Path, n: int = 12) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in lines[-n:])


class _StoreBar:
    """One progress bar over the blocks of a store that other processes fill."""

    def __init__(self, path: str, enabled: bool | None):
        from tqdm.auto import tqdm

        disable = not (sys.stderr.isatty() if enabled is None else enabled)
        self.path = path
        self.bar = tqdm(desc=f"collect {_fs.path(path).name}", unit="block", disable=disable)

    def update(self) -> None:
        if self.bar.disable:
            return
        try:
            prog = ComponentDataset(self.path).progress()
        except (FileNotFoundError, CoarError):
            return  # no store yet: the first worker is still starting
        self.bar.total = prog["n_blocks"]
        self.bar.n = prog["done_blocks"]
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _child_main(argv: Sequence[str]) -> int:
    """Entry point of a ``local`` worker process: ``python -m coarpy.launch SPEC_JSON``."""
    spec = json.loads(argv[0])
    import torch

    torch.set_num_threads(int(spec["threads"]))
    cfg = _config_from_text(spec["config"])
    try:
        worker(
            cfg,
            shard=tuple(spec["shard"]),
            claim=bool(spec["claim"]),
            lease_s=float(spec["lease_s"]),
            device=spec["device"],
            progress=False,
        )
    except CoarError as err:
        print(f"coar worker: {type(err).__name__}: {err}", file=sys.stderr)
        return _USER_ERROR
    return 0


# -- SLURM through submitit ----------------------------------------------------------


class SlurmWorker:
    """What each task of a submitit job array runs: ``worker`` on shard k of K.

    submitit calls ``checkpoint`` when SLURM preempts the task or its time runs out;
    returning the same call makes submitit requeue the task, which then skips the
    blocks already done (the block in progress is recomputed). A coarpy error is
    returned as text rather than raised, so that the launcher does not retry it.
    """

    def __init__(self, config: str, *, claim: bool, lease_s: float, device: str | None):
        self.config = config  # TOML text: the task needs no file beyond the store
        self.claim = claim
        self.lease_s = lease_s
        self.device = device

    def __call__(self, k: int, n: int) -> str | None:
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        try:
            worker(
                _config_from_text(self.config),
                shard=(k, n),
                claim=self.claim,
                lease_s=self.lease_s,
                device=self.device,
                progress=False,
            )
        except CoarError as err:
            print(f"coar worker: {type(err).__name__}: {err}", file=sys.stderr)
            return f"{type(err).__name__}: {err}"
        return None

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def slurm(
    run: RunConfig | str | os.PathLike,
    *,
    n_workers: int,
    executor: Any = None,
    folder: str | os.PathLike | None = None,
    restarts: int = 2,
    wait: bool = True,
    claim: bool = True,
    lease_s: float = LEASE_S,
    device: str | None = None,
    progress: bool | None = None,
    poll_s: float = 5.0,
    **parameters: Any,
) -> list:
    """Collect a run with a SLURM job array of ``n_workers`` tasks, through submitit.

    Task k runs ``worker`` on shard k/n_workers (with ``claim``, then any block no
    live worker holds). On preemption or timeout submitit requeues the task (see
    ``SlurmWorker.checkpoint``); with ``wait``, this process also watches the tasks
    and resubmits one that crashed, up to ``restarts`` times per shard.

    Parameters
    ----------
    run : a ``RunConfig``, a TOML configuration file, or a run directory.
    n_workers : tasks in the array.
    executor : a submitit executor (default ``submitit.AutoExecutor(folder)``, which
        is SLURM on a cluster; tests pass ``submitit.LocalExecutor``).
    folder : logs and submission files (default ``RUN/logs/slurm/%j``): one log per task.
    wait : watch the tasks until the run is done; False returns once submitted.
    device : device inside each task (default: the configuration's), e.g. "cuda".
    **parameters : for ``executor.update_parameters``, e.g. ``timeout_min=600,
        slurm_partition="gpu", gpus_per_node=1, slurm_array_parallelism=32``.

    Returns
    -------
    The submitit jobs, one per shard (the last submission of each).
    """
    submitit = _require("submitit", "slurm")
    cfg = _config(run)
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}.")
    if executor is None:
        executor = submitit.AutoExecutor(folder=str(folder or _log_dir(cfg) / "slurm" / "%j"))
    if parameters:
        executor.update_parameters(**parameters)
    task = SlurmWorker(_portable(cfg), claim=claim, lease_s=lease_s, device=device)
    jobs = executor.map_array(task, range(n_workers), [n_workers] * n_workers)
    if not wait:
        return jobs
    tries = [0] * n_workers
    finished = [False] * n_workers
    bar = _StoreBar(cfg.path, progress)
    try:
        while not all(finished):
            for k, job in enumerate(jobs):
                if finished[k] or not job.done():
                    continue
                error = job.exception()
                if error is None:
                    message = job.result()
                    if message:
                        raise LaunchError(f"Task {k} of {n_workers} stopped: {message}")
                    finished[k] = True
                elif tries[k] < restarts:
                    tries[k] += 1
                    log.warning(
                        "task %d failed (%s); resubmitting it (%d of %d)",
                        k, str(error).splitlines()[0] if str(error) else type(error).__name__,
                        tries[k], restarts,
                    )  # fmt: skip
                    jobs[k] = executor.submit(task, k, n_workers)
                else:
                    raise LaunchError(
                        f"Task {k} of {n_workers} failed {tries[k] + 1} times; the last "
                        f"error:\n{error}\nFix the cause and launch again: finished blocks "
                        "are kept."
                    ) from error
            bar.update()
            if not all(finished):
                time.sleep(poll_s)
    finally:
        bar.close()
    missing = ComponentDataset(cfg.path).missing_blocks()
    if missing:
        raise LaunchError(
            f"{cfg.path}: every task finished but {len(missing)} block(s) are missing "
            f"({missing[:10]}). With claim=False a task does only its own shard: launch "
            "again to fill them."
        )
    return jobs


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"This launcher needs {module}, which is not installed. Install it with "
            f"`pip install coarpy[{extra}]`, or use coarpy.launch.local on one machine."
        ) from err


# -- Ray -----------------------------------------------------------------------------


class _BlockActor:
    """A Ray actor: builds the model and the examples on its device once, then
    computes the blocks it is given (``collect`` with ``blocks=[b]``)."""

    def __init__(self, config: str, device: str, threads: int | None):
        import torch

        from ._engine import ExampleSet

        if threads:
            torch.set_num_threads(threads)
        self.cfg = dataclasses.replace(_config_from_text(config), device=device)
        self.setup = self.cfg.build()
        self.setup.model.to(device)
        # the examples go to the device once, not once per block
        self.examples = ExampleSet(self.setup.data, torch.device(device), self.cfg.batch_size)

    def run(self, blocks: list[int]) -> list[int]:
        from .collect import collect

        collect(
            self.setup.model,
            self.setup.components,
            self.examples.batches,
            **_collect_settings(self.cfg, self.setup.output),
            blocks=blocks,
            progress=False,
        )
        return blocks

    def missing(self) -> list[int]:
        """Create (or check) the store; the blocks still to do."""
        self.run([])
        return ComponentDataset(self.cfg.path).missing_blocks()


def ray(
    run: RunConfig | str | os.PathLike,
    *,
    n_actors: int | None = None,
    gpus_per_actor: float | None = None,
    restarts: int = 2,
    progress: bool | None = None,
    address: str | None = None,
) -> ComponentDataset:
    """Collect a run on a Ray cluster: one actor per GPU, blocks sent to idle actors.

    Each actor loads the model and moves the examples to its device once (a Ray task
    per block would reload the model every time). When an actor dies (node lost,
    process killed), a new one replaces it and its block is run again; after
    ``restarts`` such failures in all, the launch stops. The store must be reachable
    from every node: a shared filesystem or an object store URL (``s3://...``). Actors
    start in a directory of Ray's: a relative store path is made absolute, but paths
    in ``factory_args`` must be absolute (or URLs) already.

    Parameters
    ----------
    run : a ``RunConfig``, a TOML configuration file, or a run directory.
    n_actors : actors to start (default: one per GPU of the cluster, or one per CPU
        when it has none).
    gpus_per_actor : GPUs reserved per actor (default: 1 if the cluster has GPUs,
        else 0 and the actor runs on CPU with one thread).
    restarts : actor failures tolerated over the whole launch.
    address : the cluster to join when Ray is not initialised yet (default: a local
        one, or the one in RAY_ADDRESS).
    """
    ray_lib = _require("ray", "ray")
    cfg = _config(run)
    if restarts < 0:
        raise ValueError(f"restarts must be >= 0, got {restarts}.")
    if not ray_lib.is_initialized():
        ray_lib.init(address=address)
    resources = ray_lib.cluster_resources()
    if gpus_per_actor is None:
        gpus_per_actor = 1 if resources.get("GPU", 0) >= 1 else 0
    if n_actors is None:
        if gpus_per_actor:
            n_actors = int(resources.get("GPU", 0) // gpus_per_actor)
        else:
            n_actors = int(resources.get("CPU", 1))
    if n_actors < 1:
        raise ValueError(
            f"n_actors must be >= 1, got {n_actors} (cluster resources: {resources}). Pass "
            "n_actors, or gpus_per_actor=0 to run on CPUs."
        )
    device = "cuda" if gpus_per_actor else "cpu"
    # max_restarts=0: a dead actor is replaced here, where its block is known
    actor_cls = ray_lib.remote(num_gpus=gpus_per_actor, num_cpus=1, max_restarts=0)(_BlockActor)
    text = _portable(cfg)

    def new_actor():
        return actor_cls.remote(text, device, None if gpus_per_actor else 1)

    actors = [new_actor() for _ in range(n_actors)]
    failures = 0

    def failed(err: Exception, what: str) -> None:
        nonlocal failures
        if isinstance(err, CoarError):
            raise err  # a RayTaskError that is also the CoarError raised in the actor
        failures += 1
        if failures > restarts:
            raise LaunchError(
                f"Ray actors failed {failures} times ({what}); the last error: {err}. Fix "
                "the cause and launch again: finished blocks are kept."
            ) from err
        log.warning("%s failed (%s); replacing the actor (%d of %d)", what, err, failures, restarts)

    bar = _StoreBar(cfg.path, progress)
    try:
        missing = None
        while missing is None:
            try:
                missing = ray_lib.get(actors[0].missing.remote())
            except Exception as err:  # the actor died while loading the model
                failed(err, "preparing the store")
                ray_lib.kill(actors[0])
                actors[0] = new_actor()
        queue = collections.deque(missing)
        idle = list(actors)
        running: dict[Any, tuple[Any, int]] = {}
        while queue or running:
            while queue and idle:
                actor, block = idle.pop(), queue.popleft()
                running[actor.run.remote([block])] = (actor, block)
            ready, _ = ray_lib.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                actor, block = running.pop(ref)
                try:
                    ray_lib.get(ref)
                    idle.append(actor)
                except Exception as err:
                    failed(err, f"block {block}")
                    queue.appendleft(block)
                    ray_lib.kill(actor)
                    actors.remove(actor)
                    actors.append(new_actor())
                    idle.append(actors[-1])
            bar.update()
    finally:
        bar.close()
        for actor in actors:
            ray_lib.kill(actor)
    _save_config(cfg)
    return ComponentDataset(cfg.path)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
