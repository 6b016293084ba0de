"""Benchmark: collection scaled over worker processes on one machine (``coarpy.runs.local``).

For the digits CNN (450 test digits) and a Fashion-MNIST CNN (1,000 test images),
random weights (speed does not depend on training):

- ``plain``: one pass of the model over the examples (forward + margin, inference_mode,
  no hooks, no store, one thread): the least one mask can cost.
- ``overhead ratio``: collect's CPU time per mask over a plain pass's, from runs that
  alternate with plain passes (RESULTS_scaling.md models the paper's runs with it).
- ``inproc``: ``coarpy.collect`` in this process, one thread: rate and CPU per mask.
- ``control``: plain passes (no coarpy) in one and in two processes at once, one thread
  each: what a second process gains on this machine at the time, the ceiling for the
  speed-up of collection.
- ``local cpu:1`` and ``local cpu:2``: ``coarpy.runs.local.launch`` with one and with two worker
  processes, one torch thread each (the speed-up of processes, at most 2 on 2 cores);
  and ``local cpu:1 x2 threads``: one worker using both cores as threads, the other
  way to use a 2-core machine. Reported: wall time (with process start-up) and the
  steady rate (masks per second between the first and the last block written).

On a shared machine other jobs take cores, and wall-clock rates say more about them
than about coarpy; the load average is recorded around every run. What other jobs do
not change is the CPU time the workers spend per mask (``cpu_s_per_mask``: the workers'
user+sys time, minus a second launch on the finished store that measures start-up
alone). If two workers spend no more CPU per mask than one, two free cores give twice
the rate: ``idle_speedup_2_vs_1`` = 2 x cpu_s_per_mask(cpu:1) / cpu_s_per_mask(cpu:2).

Runs alternate between the settings compared, ``--repeat`` times; medians are shown.
Last, the paper's three collections are modelled on 1, 8 and 64 GPUs from the larger
of the two overhead ratios (``paper_model``). Results go to ``bench/out/scaling.json``.

Usage::

    python bench/scaling.py            # about 6 minutes on a 2-core box
    python bench/scaling.py --quick    # about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ALPHA = 0.05


# -- the two setups (factories for RunConfig: "scaling:digits_setup") -----------------


def digits_setup(seed: int = 0) -> dict:
    from coarpy.components import Components
    from coarpy.demo import DigitsCNN, digits

    torch.manual_seed(seed)
    model = DigitsCNN().eval()
    data = digits(split="test")  # 450 digits
    return {"model": model, "data": data, "components": _components(model, Components)}


def fashion_setup(seed: int = 0, n_examples: int = 1000) -> dict:
    from coarpy.components import Components
    from coarpy.demo import FashionCNN, fashion_mnist

    torch.manual_seed(seed)
    model = FashionCNN().eval()
    data = fashion_mnist(split="test", limit=n_examples)
    return {"model": model, "data": data, "components": _components(model, Components)}


def _components(model, components_cls):
    return components_cls.discover(model, kinds=("conv", "neurons"))


SETUPS = {"digits": "scaling:digits_setup", "fashion": "scaling:fashion_setup"}


# -- measurements ------------------------------------------------------------------------


def overhead_ratio(setup: dict, work: Path, *, rounds: int = 7) -> tuple[float, float, list]:
    """CPU seconds of a plain pass, and collect's CPU per mask over it (median ratio).

    Plain passes (forward + margin, inference_mode, no hooks) and collect runs of the
    same number of masks into fresh stores alternate, ``rounds`` times, so that drift
    in what other jobs do cancels out; CPU time of this process, one thread.
    """
    from coarpy import outputs
    from coarpy.collect import collect

    model, data, comps = setup["model"], setup["data"], setup["components"]
    with torch.inference_mode():
        t = time.process_time()
        outputs.margin(model, data)
        n = max(3, min(30, int(1.0 / max(time.process_time() - t, 1e-3))))  # ~1 s a side
    ratios, plains = [], []
    for r in range(rounds):
        with torch.inference_mode():
            t = time.process_time()
            for _ in range(n):
                outputs.margin(model, data)
            plain = (time.process_time() - t) / n
        t = time.process_time()
        collect(model, comps, data, path=work / f"ratio-{r}", n_masks=n, alpha=ALPHA,
                block_size=n, progress=False)  # fmt: skip
        ratios.append((time.process_time() - t) / n / plain)
        plains.append(plain)
    return statistics.median(plains), statistics.median(ratios), ratios


def block_rate(path: Path) -> float:
    """Masks per second between the first and the last block written."""
    from coarpy.store import ComponentDataset

    ds = ComponentDataset(path)
    done = sorted((ds.block_path(b).stat().st_mtime, b) for b in ds.done_blocks())
    rows = sum(ds.block_rows(b)[1] - ds.block_rows(b)[0] for _, b in done[1:])
    return rows / (done[-1][0] - done[0][0])


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def plain_loop(name: str, seconds: float) -> None:
    """Child of ``control_rate``: plain passes for ``seconds`` after a warm-up; print the rate."""
    from coarpy import outputs
    from coarpy._imports import import_object

    setup = import_object(SETUPS[name])()
    with torch.inference_mode():
        outputs.margin(setup["model"], setup["data"])
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            outputs.margin(setup["model"], setup["data"])
            n += 1
    print(n / (time.perf_counter() - t))


def control_rate(name: str, n_processes: int, seconds: float) -> float:
    """Plain passes per second of ``n_processes`` processes together, one thread each.

    The same model and examples with no coarpy in the loop: how much a second process
    gains on this machine right now, the ceiling for the collection's speed-up.
    """
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", name, f"--seconds={seconds}"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(n_processes)
    ]
    return sum(float(proc.communicate()[0].split()[-1]) for proc in procs)


def measure(name: str, *, target_s: float, repeat: int, work: Path) -> dict:
    from coarpy._imports import import_object
    from coarpy.runs import RunConfig, collect_run, local

    factory = SETUPS[name]
    setup = import_object(factory)()
    n_examples = len(setup["data"][1])
    n_components = len(setup["components"])
    plain, ratio, ratios = overhead_ratio(setup, work / f"{name}-ratio")

    # in-process, one thread: calibrates n_masks and gives the overhead ratio
    def config(path: Path, n_masks: int, block_size: int) -> RunConfig:
        return RunConfig(
            factory=factory, path=str(path), n_masks=n_masks, alpha=ALPHA,
            block_size=block_size,
        )  # fmt: skip

    probe = work / f"{name}-probe"
    t = time.perf_counter()
    collect_run(config(probe, 10, 5), progress=False)
    per_mask = (time.perf_counter() - t) / 10
    n_masks = max(40, int(target_s / per_mask) // 20 * 20)
    block_size = n_masks // 20  # 20 blocks: a short tail at the end
    inproc = work / f"{name}-inproc"
    t, cpu = time.perf_counter(), time.process_time()
    collect_run(config(inproc, n_masks, block_size), progress=False)
    inproc_s, inproc_cpu = time.perf_counter() - t, time.process_time() - cpu
    settings = {"cpu:1": ("cpu:1", 1), "cpu:2": ("cpu:2", 1), "cpu:1 x2 threads": ("cpu:1", 2)}
    runs: dict[str, list[dict]] = {key: [] for key in settings}
    control: dict[str, list[float]] = {"1": [], "2": []}
    for r in range(repeat):
        for k in control:
            control[k].append(control_rate(name, int(k), seconds=min(target_s / 2, 15.0)))
        print(
            f"  {name} control run {r}: plain passes/s, 1 process {control['1'][-1]:.2f}, "
            f"2 processes {control['2'][-1]:.2f}",
            flush=True,
        )
        for key, (devices, threads) in settings.items():
            path = work / f"{name}-{devices.replace(':', '')}-{threads}-{r}"
            cfg = config(path, n_masks, block_size)
            load, cpu = os.getloadavg()[0], _children_cpu_s()
            t = time.perf_counter()
            local.launch(cfg, devices=devices, threads=threads, poll_s=0.2)
            wall = time.perf_counter() - t
            cpu_run = _children_cpu_s() - cpu
            cpu = _children_cpu_s()
            local.launch(cfg, devices=devices, threads=threads, poll_s=0.2)  # start-up only
            cpu_startup = _children_cpu_s() - cpu
            runs[key].append(
                {
                    "wall_s": wall,
                    "rate": block_rate(path),
                    "cpu_s_per_mask": (cpu_run - cpu_startup) / n_masks,
                    "startup_cpu_s": cpu_startup,
                    "load": [load, os.getloadavg()[0]],
                }
            )
            shutil.rmtree(path)
            last = runs[key][-1]
            print(
                f"  {name} {key} run {r}: wall {wall:.1f} s, {last['rate']:.2f} masks/s, "
                f"{1e3 * last['cpu_s_per_mask']:.1f} CPU ms/mask, load "
                f"{load:.1f} -> {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    med = {
        d: {
            k: statistics.median(x[k] for x in v)
            for k in ("wall_s", "rate", "cpu_s_per_mask", "startup_cpu_s")
        }
        for d, v in runs.items()
    }
    return {
        "n_examples": n_examples,
        "n_components": n_components,
        "n_masks": n_masks,
        "block_size": block_size,
        "plain_pass_s": plain,
        "inproc_1thread_s_per_mask": inproc_s / n_masks,
        "inproc_1thread_rate": block_rate(inproc),
        "inproc_1thread_cpu_s_per_mask": inproc_cpu / n_masks,
        "overhead_ratio": ratio,  # CPU time, one thread, alternating runs
        "overhead_ratios": ratios,
        "local": med,
        "local_runs": runs,
        "speedup_rate_2_vs_1": med["cpu:2"]["rate"] / med["cpu:1"]["rate"],
        "control_plain_passes_per_s": control,
        "control_speedup_2_vs_1": statistics.median(control["2"]) / statistics.median(control["1"]),
        "speedup_wall_2_vs_1": med["cpu:1"]["wall_s"] / med["cpu:2"]["wall_s"],
        "speedup_rate_2proc_vs_1thread": med["cpu:2"]["rate"] / block_rate(inproc),
        "speedup_rate_2proc_vs_2threads": med["cpu:2"]["rate"] / med["cpu:1 x2 threads"]["rate"],
        "idle_speedup_2_vs_1": 2 * med["cpu:1"]["cpu_s_per_mask"] / med["cpu:2"]["cpu_s_per_mask"],
    }


# -- the paper's three runs, modelled from measured ratios --------------------------------

# (name, components, masks, examples, reference seconds per mask on one GPU).
# Masks, components and examples: the reference scripts' store specifications. Seconds
# per mask: the reference pipeline's measured cost for the CIFAR ResNet (10,000 images)
# and ResNet-50 (50,000 ImageNet images). ViT-B/16 has no measured cost: scaled from
# ResNet-50 by forward FLOPs per image (17.6 / 4.1 GFLOPs) and examples (5,000 / 50,000).
PAPER_RUNS = (
    ("CIFAR-10 ResNet-18", 2_304, 50_000, 10_000, 0.72),
    ("ImageNet ResNet-50", 22_720, 100_000, 50_000, 8.5),
    ("ImageNet ViT-B/16", 82_944, 100_000, 5_000, 8.5 * 17.6 / 4.1 * 5_000 / 50_000),
)
GPUS = (1, 8, 64)


def paper_model(overhead_ratio: float, *, block_size: int = 100) -> list[dict]:
    """Hours to collect each paper run on K GPUs.

    A mask costs ``overhead_ratio`` plain passes; the reference's seconds per mask are
    taken as the cost of a plain pass, an upper bound (they include the reference's
    own per-mask copying and data loading), so the hours are upper bounds too. Blocks
    are independent and claimed dynamically, so K GPUs take ceil(n_blocks / K) block
    times: the only loss is the last, partly filled round of blocks. Start-up (loading
    the model and moving the examples to the device) is left out: minutes, once per
    worker.
    """
    rows = []
    for name, n_comp, n_masks, n_examples, ref_s in PAPER_RUNS:
        per_mask = ref_s * overhead_ratio
        n_blocks = -(-n_masks // block_size)
        row = {
            "run": name, "components": n_comp, "masks": n_masks, "examples": n_examples,
            "reference_s_per_mask": ref_s, "reference_1gpu_h": n_masks * ref_s / 3600,
            "store_gb_float32": n_masks * (-(-n_comp // 8) + 4 * n_examples) / 1e9,
        }  # fmt: skip
        for k in GPUS:
            hours = -(-n_blocks // k) * block_size * per_mask / 3600
            row[f"coarpy_{k}gpu_h"] = hours
            row[f"efficiency_{k}gpu"] = n_masks * per_mask / 3600 / k / hours
        rows.append(row)
    return rows


def print_paper_model(overhead_ratio: float) -> None:
    print(f"paper runs, modelled with overhead ratio x{overhead_ratio:.2f} (hours):")
    head = "  run                   ref 1 GPU" + "".join(f"   {k:>2} GPU" for k in GPUS)
    print(head)
    for row in paper_model(overhead_ratio):
        cells = "".join(f"  {row[f'coarpy_{k}gpu_h']:7.1f}" for k in GPUS)
        print(f"  {row['run']:<20} {row['reference_1gpu_h']:9.1f} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, one repeat")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", choices=sorted(SETUPS), nargs="*", default=sorted(SETUPS))
    parser.add_argument("--out", default=str(HERE / "out" / "scaling.json"))
    parser.add_argument("--plain", choices=sorted(SETUPS), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:  # a child of control_rate
        torch.set_num_threads(1)
        plain_loop(args.plain, args.seconds)
        return
    torch.set_num_threads(1)
    # the workers import this file's factories, one thread each unless told otherwise
    sys.path.insert(0, str(HERE))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *sys.path])
    target_s = 8.0 if args.quick else 40.0
    repeat = 1 if args.quick else args.repeat
    results = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "alpha": ALPHA, "target_s": target_s, "repeat": repeat, "setups": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="coar-scaling-") as tmp:
        for name in args.only:
            print(f"{name}:", flush=True)
            res = measure(name, target_s=target_s, repeat=repeat, work=Path(tmp))
            results["setups"][name] = res
            loc = res["local"]
            print(
                f"  {res['n_examples']} examples, {res['n_components']} components, "
                f"{res['n_masks']} masks in blocks of {res['block_size']}\n"
                f"  plain pass {1e3 * res['plain_pass_s']:.2f} CPU ms; collect "
                f"{1e3 * res['inproc_1thread_cpu_s_per_mask']:.2f} CPU ms/mask "
                f"(x{res['overhead_ratio']:.2f}), wall {1e3 * res['inproc_1thread_s_per_mask']:.2f}"
                " ms/mask\n"
                + "".join(
                    f"  {key}: {v['rate']:.2f} masks/s, wall {v['wall_s']:.1f} s, "
                    f"{1e3 * v['cpu_s_per_mask']:.1f} CPU ms/mask\n"
                    for key, v in loc.items()
                )
                + f"  speed-up 2 vs 1 process: rate x{res['speedup_rate_2_vs_1']:.2f} (plain "
                f"passes in 1 vs 2 processes: x{res['control_speedup_2_vs_1']:.2f}), "
                f"wall x{res['speedup_wall_2_vs_1']:.2f}; 2 processes vs 1 process with 2 "
                f"threads: x{res['speedup_rate_2proc_vs_2threads']:.2f}; on 2 free cores "
                f"(from CPU time): x{res['idle_speedup_2_vs_1']:.2f}",
                flush=True,
            )  # fmt: skip
    # the larger ratio, and never below 1: the model gives upper bounds
    ratio = max(1.0, *(r["overhead_ratio"] for r in results["setups"].values()))
    results["paper_model"] = {"overhead_ratio": ratio, "runs": paper_model(ratio)}
    print_paper_model(ratio)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
