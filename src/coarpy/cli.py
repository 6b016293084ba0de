"""The ``coar`` command: parses arguments and calls the library, nothing more.

Each subcommand calls one function of ``coarpy.runs`` (or ``demo``, ``edit``,
``report``). Every error, a bad argument included, is printed as one line on stderr
with exit status 2 (``--verbose`` adds the traceback of an unexpected one); ``coar
verify`` exits with 1 when it finds damage it did not repair.

``coar collect``, ``worker``, ``evaluate``, ``edit`` and ``fit`` (for its gradient
prior) import and run the factory a run configuration names (trust it like a pickle);
``status``, ``report``, ``verify`` and ``fit --prior none`` import nothing from it.
As with ``python -m``, the current directory comes first on ``sys.path`` while a
command runs, so ``factory = "mysetup:build"`` finds ``./mysetup.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import NoReturn

from . import __version__
from .errors import CoarError

USAGE_ERROR = 2  # every error: bad arguments, bad configuration, failed run
DAMAGED = 1  # coar verify found damage it did not repair


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (a bad one is a one-line usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _shard(text: str) -> tuple[int, int]:
    from .runs import parse_shard

    try:
        return parse_shard(text)
    except CoarError as err:
        raise argparse.ArgumentTypeError(f"expected k/K such as 0/4, got {text!r}") from err


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="coar",
        description="COAR: attribute a model's predictions to its components, and edit it.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    p.add_argument("--version", action="version", version=f"coar (coarpy) {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("demo", help="the whole method on real data in a few minutes (CPU)")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--n-masks", type=_at_least(1), default=None, help="training masks")
    d.add_argument("--eval-masks", type=_at_least(3), default=None, help="held-out masks per alpha")
    d.add_argument(
        "--n-examples", type=_at_least(1), default=None, help="held-out digits to attribute"
    )
    d.add_argument("--seed", type=_at_least(0), default=0, help="seed of every draw (default 0)")

    c = sub.add_parser("collect", help="collect (or resume) a component dataset from CONFIG")
    c.add_argument("config", help="TOML run configuration (see coarpy.runs.config)")
    c.add_argument("--shard", type=_shard, default=None, help="k/K: only blocks b%%K==k")
    c.add_argument(
        "--launcher", choices=("local", "slurm", "ray"), default=None,
        help="run many workers: local processes, a SLURM job array (submitit), or Ray actors",
    )  # fmt: skip
    c.add_argument(
        "--devices", default=None,
        help="local launcher: cuda:0,cuda:1 or cpu:N (one process each; default cpu:1)",
    )  # fmt: skip
    c.add_argument("--workers", type=_at_least(1), default=None, help="slurm tasks / ray actors")
    c.add_argument("--restarts", type=_at_least(0), default=2, help="restarts of a dead worker")
    c.add_argument(
        "--until-r-gain", type=float, default=None, metavar="GAIN",
        help="stop once doubling the masks raises held-out mean r by less than GAIN "
        "(one process; the curve is saved as RUN/learning_curve.json)",
    )  # fmt: skip
    c.add_argument(
        "--until-min-masks", type=_at_least(20), default=200,
        help="with --until-r-gain: first check at this many masks, then at each doubling",
    )  # fmt: skip
    c.add_argument(
        "--overwrite", action="store_true",
        help="discard a store at the run's path built with other settings (not with --launcher)",
    )  # fmt: skip

    w = sub.add_parser("worker", help="fill this worker's blocks of an existing run")
    w.add_argument("run", help="run directory made by `coar collect`")
    w.add_argument(
        "--shard",
        type=_shard,
        default=None,
        help="k/K (default: SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE, else all)",
    )
    w.add_argument(
        "--claim", action="store_true",
        help="then take any block no live worker holds (lease files); stop when all are done",
    )  # fmt: skip

    s = sub.add_parser("status", help="progress, speed, ETA and settings of a run")
    s.add_argument("run", help="run directory (or a TOML configuration naming it)")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    f = sub.add_parser("fit", help="fit attributions to a run's component dataset")
    f.add_argument("run", help="run directory made by `coar collect`")
    f.add_argument(
        "--method", choices=("group", "ridge", "ols", "lasso"), default="group",
        help="group (default: per-module penalties, centred on the prior), ridge, ols or lasso",
    )  # fmt: skip
    f.add_argument(
        "--prior", choices=("gradient", "expected_gradient", "none"), default=None,
        help="group's prior mean: gradient (default when the run's config builds the model; "
        "imports its factory), expected_gradient (the gradient averaged over 16 ablation "
        "states: 16 backward passes) or none (imports nothing from the config)",
    )  # fmt: skip
    f.add_argument(
        "--solver", choices=("auto", "eig", "dual", "cg"), default="auto",
        help="auto (default: chosen by estimated time and memory, logged), eig, dual or cg",
    )  # fmt: skip
    f.add_argument(
        "--l2-grid", type=float, nargs="+", default=None, metavar="L2",
        help="penalties to choose from by validation (default: the method's grid)",
    )  # fmt: skip
    f.add_argument(
        "--val-fraction", type=float, default=None, help="ridge/lasso: held-out share of rows"
    )

    e = sub.add_parser("evaluate", help="held-out correlation of a run's attributions")
    e.add_argument("run", help="run directory with fitted attributions (`coar fit RUN`)")
    e.add_argument(
        "--alphas", type=float, nargs="+", default=None, metavar="ALPHA",
        help="ablation fractions to evaluate at (default: the run's alpha)",
    )  # fmt: skip
    e.add_argument(
        "--n-masks", type=_at_least(3), default=100,
        help="fresh held-out masks per alpha (default 100)",
    )  # fmt: skip
    e.add_argument(
        "--seed", type=_at_least(0), default=1,
        help="seed of the held-out masks; differ from the run's seed (default 1)",
    )  # fmt: skip
    e.add_argument(
        "--baselines",
        nargs="*",
        default=["leave_one_out", "gradient"],
        help="baselines evaluated on the same masks: leave_one_out, gradient, "
        "expected_gradient (default: leave_one_out gradient)",
    )
    e.add_argument(
        "--no-check", action="store_true",
        help="evaluate even if the attributions were fitted under another model or settings",
    )  # fmt: skip
    ed = sub.add_parser("edit", help="ablate the components that move target examples (Coar-Edit)")
    ed.add_argument("run", help="run directory with fitted attributions (`coar fit RUN`)")
    ed.add_argument(
        "--targets", type=int, nargs="+", required=True, metavar="I",
        help="indices of the run's examples whose outputs to change",
    )  # fmt: skip
    ed.add_argument(
        "--references", type=int, nargs="+", default=None, metavar="I",
        help="indices of the examples to keep (default: every other example)",
    )  # fmt: skip
    ed.add_argument("--k", type=_at_least(0), required=True, help="number of components to ablate")
    ed.add_argument(
        "--direction", choices=("raise", "lower"), default="raise",
        help="raise (default) or lower the target outputs relative to the references",
    )  # fmt: skip
    ed.add_argument(
        "--name", default=None, help="saves RUN/edits/NAME.json and NAME.pt (default: DIRECTION-kK)"
    )
    ed.add_argument(
        "--ks", type=int, nargs="*", default=None, metavar="K",
        help="edit sizes measured for the curve (default: 0, powers of two below k, k)",
    )  # fmt: skip

    v = sub.add_parser("verify", help="check every file of a run (blocks, meta, copies)")
    v.add_argument("run", help="run directory made by `coar collect`")
    v.add_argument(
        "--repair", action="store_true",
        help="delete damaged blocks (recomputed by the next `coar worker RUN`) and leftovers",
    )  # fmt: skip

    r = sub.add_parser("report", help="write a self-contained HTML report of a run")
    r.add_argument("run", help="run directory (fitted, evaluated or edited: shows what exists)")
    r.add_argument("--examples", type=int, nargs="+", default=[0], help="examples to show")
    r.add_argument("--out", default=None, help="folder for report.html (default: RUN)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a bad argument (already reported in one line)
        return int(stop.code or 0)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        with _cwd_importable():
            return _dispatch(args)
    except KeyboardInterrupt:
        print(f"coar {args.command}: interrupted; finished blocks are kept", file=sys.stderr)
        return 130
    except Exception as err:  # a message for the user, not a traceback
        if not isinstance(err, (CoarError, OSError)):
            if args.verbose:
                traceback.print_exc()
            hint = "" if args.verbose else " (run with --verbose for the traceback)"
            print(
                f"coar {args.command}: {type(err).__name__}: {_one_line(err)}{hint}",
                file=sys.stderr,
            )
        else:
            message = _one_line(err)
            if args.command in ("collect", "worker"):
                # the library's fix is an argument; the command line's is a flag
                message = message.replace(LIBRARY_OVERWRITE, COMMAND_OVERWRITE)
            print(f"coar {args.command}: {message}", file=sys.stderr)
        return USAGE_ERROR


LIBRARY_OVERWRITE = "pass overwrite=True"  # as the store's mismatch messages say it
COMMAND_OVERWRITE = "run `coar collect CONFIG --overwrite`"


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current directory first on ``sys.path`` (as ``python -m`` puts it) while a
    command runs, so that a factory module next to the configuration imports."""
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a multi-line message joined with " | ")."""
    parts = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " | ".join(parts) or type(err).__name__


def _dispatch(args: argparse.Namespace) -> int:
    from . import runs
    from .errors import ArgumentError

    if args.command == "demo":
        from .demo import run_demo

        run_demo(
            args.out,
            n_masks=args.n_masks,
            eval_masks=args.eval_masks,
            n_examples=args.n_examples,
            seed=args.seed,
        )
    elif args.command == "collect":
        until = None
        if args.until_r_gain is not None:
            from .stopping import StopRule

            until = StopRule(r_gain=args.until_r_gain, min_masks=args.until_min_masks)
        if args.launcher is None:
            ds = runs.collect_run(
                args.config, shard=args.shard, until=until, overwrite=args.overwrite
            )
        elif until is not None:
            raise CoarError(
                "--until-r-gain stops one process; a launcher runs many. Drop --launcher, "
                "or --until-r-gain."
            )
        elif args.overwrite:
            raise ArgumentError(
                "--overwrite with --launcher: many workers must not discard a store at once. "
                "Run `coar collect CONFIG --overwrite` alone first (stop it after a block if "
                "you like), then launch."
            )
        else:
            ds = runs.launch(
                args.config, args.launcher, devices=args.devices, n_workers=args.workers,
                restarts=args.restarts,
            )  # fmt: skip
        print(ds)
    elif args.command == "worker":
        print(runs.collect_run(args.run, shard=args.shard or "env", claim=args.claim))
    elif args.command == "status":
        info = runs.status(args.run)
        print(json.dumps(info, indent=1) if args.json else runs.format_status(info))
    elif args.command == "fit":
        attr = runs.fit_run(
            args.run, method=args.method, prior=args.prior or "auto", solver=args.solver,
            l2_grid=args.l2_grid, val_fraction=args.val_fraction,
        )  # fmt: skip
        how = attr.meta["method"] + (
            f", prior {attr.meta['prior']}" if "prior" in attr.meta else ""
        )
        print(
            f"fitted {attr.weights.shape[0]} examples x {attr.weights.shape[1]} components ({how})"
        )
    elif args.command == "evaluate":
        result = runs.evaluate_run(
            args.run,
            alphas=args.alphas,
            n_masks=args.n_masks,
            seed=args.seed,
            baselines=args.baselines,
            check=not args.no_check,
        )
        print(result.summary())
    elif args.command == "verify":
        found = runs.verify_run(args.run, repair=args.repair)
        print(f"{found['run']}: {found['done_blocks']} of {found['n_blocks']} blocks done")
        for line in found["problems"]:
            print(f"  {line}")
        if not found["problems"]:
            print("  every file checked is intact")
        elif found["repaired"]:
            print("  repaired: damaged blocks deleted; `coar worker RUN` recomputes them")
        return DAMAGED if found["unrepaired"] else 0
    elif args.command == "edit":
        from .edit import edit_run

        made = edit_run(
            args.run, targets=args.targets, references=args.references, k=args.k,
            direction=args.direction, name=args.name, ks=args.ks,
        )  # fmt: skip
        print(made.summary())
    elif args.command == "report":
        from .report import report_run

        print(report_run(args.run, examples=args.examples, out=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
