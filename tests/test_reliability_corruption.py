"""Campaign: damage every file of a finished run directory, then read and resume it.

A finished run (config.toml, meta.json, blocks, a consolidated copy, fitted
attributions, an evaluation, a worker's heartbeat, a dead worker's lease) is copied,
one file is damaged (truncated, emptied, a bit flipped, bytes scrambled, junk
appended, replaced by noise, deleted), and everything coarpy does with a run is done
to it: read the store, ``status``, ``verify``, load the attributions, the evaluation
and the configuration, and resume collection. Each must give the undamaged result or
refuse with a ``CoarError`` (or, for a missing store, a ``FileNotFoundError`` saying
so); none may return something else or crash. A resume must end with the undamaged
store's rows. Figures: bench/RESULTS_reliability.md.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

from coarpy.attributions import Attributions
from coarpy.errors import CoarError
from coarpy.evaluate import Evaluation
from coarpy.runs import RunConfig, collect_run, evaluate_run, fit_run, load_config, status
from coarpy.runs.steps import verify_run
from coarpy.store import ComponentDataset

sys.path.insert(0, str(Path(__file__).parent))
from _reliability import record  # noqa: E402

sys.path.pop(0)

SETTINGS = {"n_masks": 12, "alpha": 0.1, "seed": 7, "block_size": 4}  # 3 blocks


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: len(data) // 2]


def _empty(data: bytes, rng: random.Random) -> bytes:
    return b""


def _flip_bit(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    i = rng.randrange(len(out))
    out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _scramble(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for i in rng.sample(range(len(out)), min(8, len(out))):
        out[i] ^= rng.randrange(1, 256)
    return bytes(out)


def _append(data: bytes, rng: random.Random) -> bytes:
    return data + bytes(rng.randrange(256) for _ in range(16))


def _noise(data: bytes, rng: random.Random) -> bytes:
    return bytes(rng.randrange(256) for _ in range(max(len(data), 1)))


MUTATIONS = {
    "truncate": _truncate,
    "empty": _empty,
    "flip a bit": _flip_bit,
    "scramble 8 bytes": _scramble,
    "append junk": _append,
    "noise": _noise,
    "delete": None,
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A finished run directory with every kind of file a run holds, and what it reads as."""
    run = tmp_path_factory.mktemp("corrupt") / "run"
    cfg = RunConfig(factory="_reliability:tiny_setup", path=str(run), **SETTINGS)
    collect_run(cfg, progress=False)
    fit_run(run, progress=False)
    evaluate_run(run, n_masks=8, baselines=(), progress=False)
    ds = ComponentDataset(run)
    ds.consolidate()
    (run / "leases").mkdir(exist_ok=True)
    (run / "leases" / "b000001.lease").write_text('{"host": "gone", "pid": 1, "token": "x"}')
    truth = {
        "masks": ds.masks(),
        "outputs": ds.outputs(),
        "attributions": Attributions.load(run / "attributions"),
        "evaluation": Evaluation.load(run / "evaluation.json"),
        "config": load_config(run),
    }
    return run, truth


def _outcome(fn, same) -> str:
    """ "same", "refused" (a clear coarpy error), or "WRONG: ..." / "CRASH: ..."."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fn()
    except (CoarError, FileNotFoundError) as err:
        if isinstance(err, FileNotFoundError) and not isinstance(err, CoarError):
            assert "No component dataset" in str(err) or "does not exist" in str(err), err
        return "refused"
    except Exception as err:  # anything else is a bug
        return f"CRASH: {type(err).__name__}: {err}"
    verdict = same(got)
    if isinstance(verdict, str):
        return verdict
    return "same" if verdict else f"WRONG: {got!r}"[:200]


def _same_attributions(a: Attributions, b: Attributions) -> bool:
    return (
        torch.equal(a.weights, b.weights)
        and torch.equal(a.bias, b.bias)
        and a.names == b.names
        and a.meta == b.meta
    )


def _checks(run: Path, truth: dict) -> dict[str, str]:
    def store():
        ds = ComponentDataset(run)
        return ds.rows(), ds.masks(), ds.outputs()

    def same_store(got):
        # the finished rows, each the undamaged one (a deleted block is unfinished)
        rows, masks, outputs = got
        return (
            len(rows) > 0
            and torch.equal(masks, truth["masks"][rows])
            and torch.equal(outputs, truth["outputs"][rows])
        )

    def evaluation_same(got: Evaluation) -> bool:
        t = truth["evaluation"]
        return (
            got.attribution_names == t.attribution_names
            and torch.equal(got.pearson.nan_to_num(9), t.pearson.nan_to_num(9))
            and torch.equal(got.spearman.nan_to_num(9), t.spearman.nan_to_num(9))
            and got.meta == t.meta
        )

    def resumed():
        collect_run(run, progress=False)
        ds = ComponentDataset(run)
        n = len(truth["masks"])  # a grown n_masks (a damaged config) keeps the first rows
        return torch.arange(n), ds.masks()[:n], ds.outputs()[:n]

    return {
        "read store": _outcome(store, same_store),
        "status": _outcome(lambda: status(run), lambda got: isinstance(got, dict)),
        "verify": _outcome(lambda: verify_run(run), lambda got: isinstance(got, dict)),
        "attributions": _outcome(
            lambda: Attributions.load(run / "attributions"),
            lambda got: _same_attributions(got, truth["attributions"]),
        ),
        "evaluation": _outcome(lambda: Evaluation.load(run / "evaluation.json"), evaluation_same),
        # a configuration is text a user may edit: a damaged value can still parse, so
        # its checks are the resume's (refused, or the same rows)
        "config": _outcome(
            lambda: load_config(run),
            lambda got: got == dataclasses.replace(truth["config"], path=str(run)) or "edited",
        ),
        "resume": _outcome(resumed, same_store),  # last: it repairs what it can
    }


def test_every_damaged_file_is_read_right_or_refused(pristine, tmp_path):
    run, truth = pristine
    files = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file())
    rng = random.Random(2024)
    outcomes: dict[str, Counter] = defaultdict(Counter)
    bad, cases = [], 0
    for rel in files:
        for name, mutate in MUTATIONS.items():  # noqa: B007 (name is used in messages)
            copy = tmp_path / f"case{cases}"
            shutil.copytree(run, copy)
            target = copy / rel
            if mutate is None:
                target.unlink()
            else:
                target.write_bytes(mutate(target.read_bytes(), rng))
            if rel.parts[0] == "blocks" and mutate is not None:
                # a damaged block is named by verify, even where the consolidated copy
                # still reads right
                assert verify_run(copy)["bad_blocks"], (rel, name)
            verdicts = _checks(copy, truth)
            cases += 1
            kind = _kind(rel)
            for check, verdict in verdicts.items():
                outcomes[kind][verdict.split(":")[0]] += 1
                if verdict.startswith(("WRONG", "CRASH")):
                    bad.append(f"{rel} ({name}) -> {check}: {verdict}")
            shutil.rmtree(copy)
    rows = "\n".join(
        f"| {kind} | {c['same']} | {c['refused']} | {c['edited']} | {c['WRONG'] + c['CRASH']} |"
        for kind, c in sorted(outcomes.items())
    )
    record(
        "corruption",
        f"""
## Corruption of every file of a run directory (tests/test_reliability_corruption.py)

A finished run ({len(files)} files: config, meta, 3 blocks, a consolidated copy, fitted
attributions, an evaluation and its CSV, a heartbeat, a dead worker's lease) is copied
and one file is damaged in one of {len(MUTATIONS)} ways ({", ".join(MUTATIONS)}): {cases}
cases. Each case then reads the store, runs `status` and `verify`, loads the
attributions, the evaluation and the configuration, and resumes collection: 7 checks,
each of which must give the undamaged result ("same") or refuse with a clear coarpy
error ("refused"). A resume must end with the undamaged rows.

| damaged file | same | refused | config parsed with another value | wrong or crash |
|---|---|---|---|---|
{rows}

Cases: {cases}; checks: {sum(sum(c.values()) for c in outcomes.values())}; wrong or crashed:
{len(bad)}. A damaged consolidated copy is never read (the blocks are, with a warning);
a damaged block is named by `verify` and recomputed by the resume. The evaluation's
CSV copy is an export that coarpy never reads back. A configuration is text a user
may edit, so a damaged value can parse ("config parsed with another value"); the
resume then refused it or kept the undamaged rows.
""",
    )
    assert not bad, "\n".join(bad[:20])


def _kind(rel: Path) -> str:
    if rel.parts[0] == "blocks":
        return "blocks/*.blk"
    if rel.parts[0] == "workers":
        return "workers/*.json (heartbeat)"
    if rel.parts[0] == "leases":
        return "leases/*.lease"
    return str(rel)
