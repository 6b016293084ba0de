"""GPU check: collection and regression speed on one GPU, in one table.

Models (random weights, plain torch, ``bench/_models.py``):

- a CIFAR ResNet-18 layout at half width (2,400 conv filters), 10,000 random 32x32
  images, batch 2,000;
- a ViT with ViT-B/16 shapes (12 x 12 heads + 12 x 3,072 neurons), 1,000 random
  224x224 images, batch 500.

and, when torchvision is installed (the script installs nothing; without it these
sections are skipped with a note), the paper's ImageNet setups at ImageNet shape with
random weights and random uint8 images (``coarpy.recipes``, output ``imagenet_margin``):

- torchvision's ResNet-50, 22,720 conv filters (setup B), 2,000 images, batch 250;
- torchvision's ViT-B/16, 82,944 linear rows incl. ``in_proj_weight`` (setup C), 1,000
  images, batch 250.

For each: plain inference (forward + margin, inference_mode, data on the device),
``coarpy.collect`` (fp32 and bf16 autocast; end to end and marginal = steady-state),
the reference pipeline (deep copy + zeroed weights + DataLoader from CPU tensors per
mask), hooks vs weight slices, channels_last and the prefix cache (ResNet), and
optionally torch.compile. Then ``coarpy.regression.fit`` on 2,304 components x
10,000 examples x 20,000 synthetic masks against the products VᵀV, VᵀY, and ridge in
float32 at setup B's component count (22,720 x 10,000 examples x 20,000 masks).

Every section has a time limit; the whole run stops starting sections after
``--budget`` seconds. ``--only core`` runs the original sections, ``--only imagenet``
the ImageNet setups and setup B's fit, ``--only stream`` collect with the examples
streamed from pinned host memory against held on the device (``bench/stream.py``).
Output: a markdown table on stdout and, in ``--out`` (or $OUT), ``results.md``,
``results.json`` and ``env.txt``.

Without CUDA (or with ``--small``) everything is tiny and runs on the CPU in seconds:
CI runs it that way (tests/test_gpu_script.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import _models  # noqa: E402
from _refpipeline import (  # noqa: E402
    cast as autocast_ctx,
)
from _refpipeline import (  # noqa: E402
    collect_rates,
    device_batches,
    plain_inference,
    reference_pipeline,
    sync,
)

import coarpy as coar  # noqa: E402
from coarpy import outputs  # noqa: E402
from coarpy.ablation import Ablator  # noqa: E402
from coarpy.collect import ExampleSet, run_masks  # noqa: E402
from coarpy.masks import sample_masks  # noqa: E402


class SectionTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int):
    """Raise SectionTimeout in the main thread after ``seconds`` (POSIX alarm)."""

    def on_alarm(signum, frame):
        raise SectionTimeout(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Report:
    """Rows of the table, the raw numbers, and the log; flushed as they come."""

    def __init__(self, out: Path | None):
        self.out = out
        self.rows: list[dict] = []
        self.started = time.perf_counter()
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    def log(self, text: str) -> None:
        stamp = f"[{time.perf_counter() - self.started:6.1f}s]"
        print(f"{stamp} {text}", flush=True)

    def add(self, **row) -> None:
        self.rows.append(row)
        self.log("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
        self.save()

    def table(self) -> str:
        cols = ["section", "model", "N", "E", "setting", "plain", "collect", "marginal",
                "ratio", "reference", "vs_ref", "note"]  # fmt: skip
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
        return "\n".join(lines)

    def save(self) -> None:
        if self.out is None:
            return
        (self.out / "results.json").write_text(json.dumps(self.rows, indent=1, default=str))
        (self.out / "results.md").write_text(self.table() + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _images(n: int, size: int, device, seed: int, classes: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=gen)
    return x, torch.randint(0, classes, (n,), generator=gen)


def _n_for(seconds_per_mask: float, target_s: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, target_s / max(seconds_per_mask, 1e-6))))


def bench_model(rep: Report, cfg: dict, args) -> None:
    """plain / collect (fp32, bf16) / reference rows for one model."""
    dev, model, comps = cfg["device"], cfg["model"], cfg["comps"]
    x_cpu, y_cpu, bs = cfg["x"], cfg["y"], cfg["batch_size"]
    output = cfg.get("output", outputs.margin)
    batches = device_batches(x_cpu, y_cpu, bs, dev)
    data = batches_cat(batches)  # (x, y) on the device, as collect takes it
    name, n, e = cfg["name"], len(comps), len(x_cpu)
    for precision in cfg["precisions"]:
        cast = None if precision == "fp32" else precision
        plain = plain_inference(model, batches, output, 1, device=dev, autocast=cast)
        n_plain = _n_for(1 / plain, args.target_s, 2, 200)
        plain = plain_inference(model, batches, output, n_plain, device=dev, autocast=cast)
        n_masks = _n_for(1 / plain, args.target_s, cfg["min_masks"], 2000)
        block = max(1, n_masks // 4)
        rates = collect_rates(model, comps, data, n_masks, n_base=block, alpha=0.05,
                              block_size=block, batch_size=bs, autocast=cast,
                              output=output)  # fmt: skip
        n_ref = max(1, min(cfg["ref_masks"], n_masks))
        keep = sample_masks(0, n_ref, n, alpha=0.05, seed=0)
        ref, _ = reference_pipeline(model, comps, x_cpu, y_cpu, keep, output,
                                    batch_size=bs, device=dev, autocast=cast)  # fmt: skip
        rep.add(section="collect", model=name, N=n, E=e, setting=precision, plain=plain,
                collect=rates["end_to_end"], marginal=rates.get("marginal"),
                ratio=rates.get("marginal", rates["end_to_end"]) / plain, reference=ref,
                vs_ref=rates["end_to_end"] / ref, note=f"{n_masks} masks, batch {bs}")  # fmt: skip


def batches_cat(batches: list) -> tuple:
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys)


def bench_paths(rep: Report, cfg: dict, args) -> None:
    """run_masks with hooks vs weight slices, against plain inference (bf16 on GPU)."""
    dev, model, comps = cfg["device"], cfg["model"], cfg["comps"]
    precision = cfg["precisions"][-1]
    cast = None if precision == "fp32" else precision
    examples = ExampleSet((cfg["x"], cfg["y"]), dev, cfg["batch_size"])
    plain = plain_inference(model, examples.batches, outputs.margin, 3, device=dev, autocast=cast)
    n = _n_for(1 / plain, args.target_s / 2, 2, 400)
    keep = sample_masks(0, n, len(comps), alpha=0.05, seed=0)
    found = {}
    for edit in (False, True):
        ablator = Ablator(model, comps, edit_weights=edit)
        with ablator, torch.inference_mode(), autocast_ctx(dev, cast):
            run_masks(model, ablator, examples, keep[:1], outputs.margin)  # warm-up
            sync(dev)
            start = time.perf_counter()
            run_masks(model, ablator, examples, keep, outputs.margin)
            sync(dev)
            found[edit] = n / (time.perf_counter() - start)
    rep.add(section="paths", model=cfg["name"], N=len(comps), E=len(cfg["x"]), setting=precision,
            plain=plain, collect=found[True], ratio=found[True] / plain,
            note=f"hooks: {found[False]:.3g}/s = {found[False] / plain:.3f} x plain")  # fmt: skip


def bench_channels_last(rep: Report, cfg: dict, args) -> None:
    dev, model, comps = cfg["device"], cfg["model"], cfg["comps"]
    precision = cfg["precisions"][-1]
    cast = None if precision == "fp32" else precision
    cl = torch.channels_last
    model.to(memory_format=cl)
    try:
        x = cfg["x"].to(dev).contiguous(memory_format=cl)
        y = cfg["y"].to(dev)
        batches = [(x[i : i + cfg["batch_size"]], y[i : i + cfg["batch_size"]])
                   for i in range(0, len(x), cfg["batch_size"])]  # fmt: skip
        plain = plain_inference(model, batches, outputs.margin, 3, device=dev, autocast=cast)
        n_masks = _n_for(1 / plain, args.target_s, cfg["min_masks"], 2000)
        block = max(1, n_masks // 4)
        kw = {"alpha": 0.05, "batch_size": cfg["batch_size"], "autocast": cast}
        rates = collect_rates(model, comps, (x, y), n_masks, n_base=block, block_size=block, **kw)
    finally:
        model.to(memory_format=torch.contiguous_format)
    rep.add(section="channels_last", model=cfg["name"], N=len(comps), E=len(x),
            setting=f"{precision} channels_last", plain=plain, collect=rates["end_to_end"],
            marginal=rates["marginal"], ratio=rates["marginal"] / plain)  # fmt: skip


def bench_prefix(rep: Report, cfg: dict, args) -> None:
    dev, model = cfg["device"], cfg["model"]
    precision = cfg["precisions"][-1]
    cast = None if precision == "fp32" else precision
    comps = coar.Components.discover(model, kinds=cfg["kinds"], include=[cfg["late"] + ".*"])
    data = batches_cat(device_batches(cfg["x"], cfg["y"], cfg["batch_size"], dev))
    kw = {"alpha": 0.05, "batch_size": cfg["batch_size"], "autocast": cast}
    probe = collect_rates(model, comps, data, 2, block_size=2, **kw)["end_to_end"]
    n_masks = _n_for(1 / probe, args.target_s, cfg["min_masks"], 2000)
    block = max(1, n_masks // 4)
    full = collect_rates(model, comps, data, n_masks, n_base=block, block_size=block, **kw)
    cached = collect_rates(model, comps, data, n_masks, n_base=block, block_size=block,
                           prefix=cfg["late"], **kw)  # fmt: skip
    rep.add(section="prefix", model=cfg["name"], N=len(comps), E=len(cfg["x"]),
            setting=f"{precision} prefix={cfg['late']!r}", collect=cached["end_to_end"],
            marginal=cached["marginal"], ratio=cached["marginal"] / full["marginal"],
            note=f"no cache: {full['marginal']:.3g} masks/s (ratio = speed-up)")  # fmt: skip


def bench_compile(rep: Report, cfg: dict, args) -> None:
    dev, model, comps = cfg["device"], cfg["model"], cfg["comps"]
    precision = cfg["precisions"][-1]
    cast = None if precision == "fp32" else precision
    data = batches_cat(device_batches(cfg["x"], cfg["y"], cfg["batch_size"], dev))
    kw = {"alpha": 0.05, "batch_size": cfg["batch_size"], "autocast": cast}
    eager = collect_rates(model, comps, data, cfg["min_masks"] * 4, n_base=cfg["min_masks"],
                          block_size=cfg["min_masks"], **kw)  # fmt: skip
    start = time.perf_counter()
    compiled = collect_rates(model, comps, data, cfg["min_masks"] * 4, n_base=cfg["min_masks"],
                             block_size=cfg["min_masks"], compile_model=True, **kw)  # fmt: skip
    rep.add(section="compile", model=cfg["name"], N=len(comps), E=len(cfg["x"]),
            setting=f"{precision} compile_model", collect=compiled["end_to_end"],
            marginal=compiled["marginal"], ratio=compiled["marginal"] / eager["marginal"],
            note=f"eager marginal {eager['marginal']:.3g}/s; ratio = speed-up; "
                 f"{time.perf_counter() - start:.0f} s incl. compiling")  # fmt: skip


def bench_fit(
    rep: Report,
    dev: torch.device,
    sizes: tuple[int, int, int],
    *,
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32),
    methods: tuple[str, ...] = ("ols", "ridge"),
    label: str = "",
) -> None:
    try:
        from coarpy.regression import fit
    except ImportError:
        rep.add(section="fit", note="coarpy.regression.fit not available")
        return
    n_comp, n_ex, n_rows = sizes
    gen = torch.Generator(device=dev).manual_seed(0)
    V = torch.rand(n_rows, n_comp, generator=gen, device=dev) >= 0.05  # (rows, N) keep
    W = torch.randn(n_comp, n_ex, generator=gen, device=dev) * 0.01
    Y = V.float() @ W + 0.1 * torch.randn(n_rows, n_ex, generator=gen, device=dev)
    for dtype in dtypes:
        sync(dev)
        start = time.perf_counter()
        Vd = V.to(dtype)
        _ = Vd.T @ Vd, Vd.T @ Y.to(dtype)
        sync(dev)
        products = time.perf_counter() - start
        del Vd, _
        for method in methods:
            sync(dev)
            start = time.perf_counter()
            fit((V, Y), method=method, device=dev, dtype=dtype, progress=False)
            sync(dev)
            took = time.perf_counter() - start
            rep.add(section="fit", model=f"{label}{n_comp} x {n_ex} x {n_rows}", N=n_comp, E=n_ex,
                    setting=f"{method} {str(dtype).split('.')[-1]}", ratio=took / products,
                    note=f"fit {took:.2f} s, products {products:.2f} s "
                         "(ratio = fit / products)")  # fmt: skip


def bench_stream(rep: Report, dev: torch.device, args) -> None:
    """Streamed examples (over ``device_budget``, pinned uint8 on the host, moved a
    segment at a time) against examples held on the device (bench/stream.py)."""
    import stream

    small = args.small or dev.type != "cuda"
    if small:
        sizes = {"n_examples": 256, "width": 4, "batch_size": 64, "segment": 2,
                 "n_masks": 4, "block_size": 2, "repeat": 1}  # fmt: skip
    else:
        sizes = {"n_examples": 20_000, "width": 32, "batch_size": 1000, "segment": 4,
                 "n_masks": 60, "block_size": 20, "repeat": 3}  # fmt: skip
    r = stream.measure(device=dev, **sizes)
    rep.add(section="stream", model="CIFAR ResNet (uint8 in)", N=r["N"], E=r["E"],
            setting=f"{r['segments']} segments/block", plain=r["resident"],
            collect=r["streamed"], ratio=r["ratio"],
            note=f"plain = examples on the device; ratio {r['ratio_min']:.3f}.."
                 f"{r['ratio_max']:.3f}; rows identical: {r['same_rows']}")  # fmt: skip


def configs(dev: torch.device, small: bool) -> list[dict]:
    if small:
        resnet = _models.cifar_resnet(width=4).to(dev)
        x, y = _images(48, 32, dev, seed=0, classes=10)
        vit = _models.vit(image=32, patch=8, dim=32, depth=2, num_heads=2, mlp=64,
                          n_classes=10).to(dev)  # fmt: skip
        xv, yv = _images(16, 32, dev, seed=1, classes=10)
        sizes = {"resnet_bs": 48, "vit_bs": 16, "min": 2, "ref": 2}
        precisions = ["fp32"]
    else:
        resnet = _models.cifar_resnet(width=32).to(dev)
        x, y = _images(10_000, 32, dev, seed=0, classes=10)
        vit = _models.vit().to(dev)  # ViT-B/16 shapes
        xv, yv = _images(1_000, 224, dev, seed=1, classes=1000)
        sizes = {"resnet_bs": 2000, "vit_bs": 500, "min": 4, "ref": 3}
        precisions = ["fp32", "bf16"]
    return [
        {"name": "CIFAR ResNet-18/2", "model": resnet, "device": dev,
         "comps": coar.Components.discover(resnet, kinds=("conv",)), "kinds": ("conv",),
         "x": x, "y": y,
         "batch_size": sizes["resnet_bs"], "precisions": precisions, "min_masks": sizes["min"],
         "ref_masks": sizes["ref"], "late": "4"},
        {"name": "ViT-B/16" if not small else "ViT (tiny)", "model": vit, "device": dev,
         "comps": coar.Components.discover(vit, kinds=("heads", "neurons")),
         "kinds": ("heads", "neurons"), "x": xv, "y": yv,
         "batch_size": sizes["vit_bs"], "precisions": precisions, "min_masks": sizes["min"],
         "ref_masks": sizes["ref"], "late": str(len(vit) - 2)},
    ]  # fmt: skip


def imagenet_configs(dev: torch.device, small: bool) -> tuple[list[dict], str | None]:
    """The paper's ImageNet setups B and C on torchvision's models, random weights and
    random uint8 images; or ``([], why)`` when torchvision is not installed.

    Small (CPU) mode keeps the real architectures and component sets (22,720 and
    82,944 components) on a few 32x32 images.
    """
    try:
        import torchvision
    except ImportError:
        return [], "skipped: torchvision is not installed (this script installs nothing)"
    from coarpy.recipes import imagenet_margin, resnet_reference_spec, vit_reference_spec

    torch.manual_seed(0)
    if small:
        resnet = torchvision.models.resnet50(weights=None)
        vit = torchvision.models.vit_b_16(weights=None, image_size=32)
        size, n_resnet, n_vit, bs_resnet, bs_vit = 32, 4, 4, 4, 4
        precisions, min_masks, ref_masks = ["fp32"], 2, 2
    else:
        resnet = torchvision.models.resnet50(weights=None)
        vit = torchvision.models.vit_b_16(weights=None)
        size, n_resnet, n_vit, bs_resnet, bs_vit = 224, 2000, 1000, 250, 250
        precisions, min_masks, ref_masks = ["fp32", "bf16"], 4, 3
    made = []
    for name, model, spec, n, bs, seed in (
        ("ResNet-50 (torchvision)", resnet, resnet_reference_spec, n_resnet, bs_resnet, 2),
        ("ViT-B/16 (torchvision)", vit, vit_reference_spec, n_vit, bs_vit, 3),
    ):
        model = model.eval().to(dev)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
        made.append({
            "name": name, "model": model, "device": dev, "output": imagenet_margin,
            "comps": coar.Components.from_spec(model, spec(model)), "x": x,
            "y": torch.randint(0, 1000, (n,), generator=gen), "batch_size": bs,
            "precisions": precisions, "min_masks": min_masks, "ref_masks": ref_masks,
        })  # fmt: skip
    return made, None


def environment(dev: torch.device) -> str:
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"host: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
        f"python: {platform.python_version()}, torch: {torch.__version__}",
        f"device: {dev}",
    ]
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        lines.append(f"gpu: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"cuda {torch.version.cuda}")  # fmt: skip
    try:
        import torchvision

        lines.append(f"torchvision: {torchvision.__version__}")
    except ImportError:
        lines.append("torchvision: not installed (ImageNet sections skipped)")
    lines.append(f"torch threads: {torch.get_num_threads()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="coarpy GPU check (collection + regression speed)")
    ap.add_argument("--out", type=Path, default=os.environ.get("OUT"),
                    help="folder for results.md/json and env.txt (default: $OUT)")  # fmt: skip
    ap.add_argument("--small", action="store_true", help="tiny sizes (automatic without CUDA)")
    ap.add_argument("--budget", type=float, default=400.0,
                    help="start no section after this many seconds")  # fmt: skip
    ap.add_argument("--target-s", type=float, default=2.5, help="seconds per timing")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--only", choices=("core", "imagenet", "stream"), default=None,
                    help="run only the original sections (core), the ImageNet setups "
                         "and setup B's fit (imagenet), or streamed vs on-device "
                         "examples (stream)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    small = args.small or not cuda
    dev = torch.device("cuda" if cuda and not args.small else "cpu")
    if small:
        args.target_s = min(args.target_s, 0.1)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rep = Report(args.out)
    env = environment(dev) + f"\nmode: {'small' if small else 'full'}"
    rep.log(env.replace("\n", " | "))
    if args.out is not None:
        (args.out / "env.txt").write_text(env + "\n")
    core = args.only in (None, "core")
    imagenet = args.only in (None, "imagenet")
    cfgs = configs(dev, small) if core else []
    limit = 40 if small else 120
    fit_sizes = (64, 100, 300) if small else (2304, 10_000, 20_000)
    fit_b_sizes = (96, 60, 200) if small else (22_720, 10_000, 20_000)  # setup B's N

    def fit_b(rep, dev, args):
        bench_fit(rep, dev, fit_b_sizes, dtypes=(torch.float32,), methods=("ridge",),
                  label="setup B: ")  # fmt: skip

    # Most important first: a late section may be cut by the time budget.
    plan = [(f"collect {c['name']}", bench_model, c, limit) for c in cfgs]
    if imagenet:
        image_cfgs, why = imagenet_configs(dev, small)
        if why is not None:
            for name in ("ResNet-50 (torchvision)", "ViT-B/16 (torchvision)"):
                rep.add(section=f"collect {name}", note=why)
        plan += [(f"collect {c['name']}", bench_model, c, 2 * limit) for c in image_cfgs]
    if core:
        plan += [("fit", lambda rep, dev, args: bench_fit(rep, dev, fit_sizes), dev, limit)]
    if imagenet:
        plan += [("fit setup B", fit_b, dev, 2 * limit)]
    if core:
        plan += [(f"paths {c['name']}", bench_paths, c, limit // 2) for c in cfgs]
        plan += [(f"prefix {c['name']}", bench_prefix, c, limit // 2) for c in cfgs]
        plan += [("channels_last", bench_channels_last, cfgs[0], limit // 2)]
    if core and not args.no_compile and not small:
        plan += [(f"compile {c['name']}", bench_compile, c, limit) for c in cfgs]
    if args.only in (None, "stream"):
        plan += [("stream", bench_stream, dev, limit)]
    failures = 0
    for title, fn, cfg, seconds in plan:
        left = args.budget - (time.perf_counter() - rep.started)
        if left < 10:
            rep.add(section=title, note="skipped: time budget used up")
            continue
        rep.log(f"section {title} (limit {min(seconds, left):.0f} s)")
        try:
            with time_limit(int(min(seconds, left))):
                fn(rep, cfg, args)
        except SectionTimeout as err:
            rep.add(section=title, note=f"timed out ({err})")
        except Exception as err:  # keep going: one broken section must not hide the rest
            failures += 1
            rep.add(section=title, note=f"failed: {type(err).__name__}: {err}")
            traceback.print_exc()
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print("\n" + rep.table(), flush=True)
    rep.save()
    rep.log(f"done, {failures} failed section(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
