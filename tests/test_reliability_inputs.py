# ruff: noqa: E501 (the table reads best one row per line)
"""Campaign: a table of bad inputs to every public entry point, each mapped to its clear
error.

Every row names an entry point, a bad input, the error class it must raise and words
its message must hold (what was expected, what was got). Rows for ``collect`` also
check that nothing was written: a bad argument never leaves a store behind. The table,
with each actual message, is written to bench/RESULTS_reliability.md.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from coarpy import runs
from coarpy.baselines import gradient, leave_one_out
from coarpy.cli import main
from coarpy.collect import collect
from coarpy.components import Components
from coarpy.errors import (
    ArgumentError,
    CollectError,
    ComponentError,
    ConfigError,
    DataError,
    EvaluationError,
    SplitError,
    StoreMismatchError,
)
from coarpy.evaluate import evaluate, evaluate_store
from coarpy.masks import sample_masks
from coarpy.runs import RunConfig, local
from coarpy.runs.leases import Claims
from coarpy.store import ComponentDataset

sys.path.insert(0, str(Path(__file__).parent))
from _reliability import record, tiny_setup  # noqa: E402

sys.path.pop(0)

GOOD = {"n_masks": 4, "alpha": 0.1, "block_size": 2, "progress": False}
RAW = {"factory": "_reliability:tiny_setup", "path": "unused", "n_masks": 4, "alpha": 0.1}
CREATE = {"components": [["a", "linear", 3]], "n_examples": 2, "n_masks": 4, "alpha": 0.1,
          "seed": 0}  # fmt: skip


@pytest.fixture(scope="module")
def k(tmp_path_factory):
    """What the rows work on: a small model, its components and examples, baseline
    attributions recording the model, a store, and a folder for each row."""
    made = tiny_setup()
    tmp = tmp_path_factory.mktemp("inputs")
    model, comps, data = made["model"], made["components"], made["data"]
    attr = leave_one_out(model, comps, data, progress=False)
    existing = collect(model, comps, data, path=tmp / "existing", **GOOD)
    other = tiny_setup()["model"]
    with torch.no_grad():
        other[0].bias.add_(1.0)
    return SimpleNamespace(
        model=model, comps=comps, data=data, attr=attr, store=existing, tmp=tmp,
        other=other, fresh=lambda name: tmp / name,
    )  # fmt: skip


def C(**given):
    """collect with one bad argument (the rest good), into a fresh folder."""

    def call(k, where):
        bad = dict(given)
        args = {"model": k.model, "components": k.comps, "data": k.data, "path": where}
        args.update({n: bad.pop(n) for n in list(bad) if n in args})
        return collect(args["model"], args["components"], args["data"], path=args["path"],
                       **{**GOOD, **bad})  # fmt: skip

    return call


def E(**given):
    def call(k, where):
        bad = dict(given)
        attrs = bad.pop("attributions", k.attr)
        comps = bad.pop("components", k.comps)
        model = bad.pop("model", k.model)
        data = bad.pop("data", k.data)
        return evaluate(attrs, model, comps, data, **{"n_masks": 5, "progress": False, **bad})

    return call


def L(fn=leave_one_out, **given):
    def call(k, where):
        bad = dict(given)
        model = bad.pop("model", k.model)
        comps = bad.pop("components", k.comps)
        data = bad.pop("data", k.data)
        return fn(model, comps, data, **{"progress": False, **bad})

    return call


def S(**bad):
    return lambda k, where: ComponentDataset.create(where, **{**CREATE, **bad})


def M(*args, **bad):
    return lambda k, where: sample_masks(*(args or (0, 2, 10)), **{"alpha": 0.1, "seed": 0, **bad})


def R(**bad):
    def call(k, where):
        raw = {**RAW, **bad}
        for name in [n for n, v in raw.items() if v is None]:
            del raw[name]
        return RunConfig.from_dict(raw, where="run.toml")

    return call


def CLI(*argv):
    def call(k, where):
        code = main([a.replace("WHERE", str(where)) for a in argv])
        raise SystemExit(code)

    return call


def _label_output(model, batch):
    return model(batch[0])  # (n, 4): not one number per example


def _nan_output(model, batch):
    return model(batch[0])[:, 0] * math.nan


def _shuffled(k):
    return DataLoader(TensorDataset(*k.data), batch_size=8, shuffle=True)


def _on_meta(k):
    return copy.deepcopy(k.model).to("meta")


ROWS = [
    # entry, bad input, call, error, words of the message
    ("collect", "n_masks=0", C(n_masks=0), ArgumentError, r"n_masks must be >= 1, got 0"),
    ("collect", "n_masks=-1", C(n_masks=-1), ArgumentError, r"n_masks must be >= 1, got -1"),
    ("collect", "n_masks=2.5", C(n_masks=2.5), ArgumentError, r"n_masks must be an integer, got 2.5"),
    ("collect", "n_masks='10'", C(n_masks="10"), ArgumentError, r"must be an integer, got '10' \(str\)"),
    ("collect", "n_masks=True", C(n_masks=True), ArgumentError, r"must be an integer, got True \(bool\)"),
    ("collect", "alpha=1.5", C(alpha=1.5), ArgumentError, r"alpha is the fraction .* \[0, 1\], got 1.5"),
    ("collect", "alpha=-0.1", C(alpha=-0.1), ArgumentError, r"\[0, 1\], got -0.1"),
    ("collect", "alpha=nan", C(alpha=math.nan), ArgumentError, r"alpha must be a finite number"),
    ("collect", "alpha=inf", C(alpha=math.inf), ArgumentError, r"alpha must be a finite number"),
    ("collect", "alpha='0.1'", C(alpha="0.1"), ArgumentError, r"alpha must be a number, got '0.1'"),
    ("collect", "alpha=None", C(alpha=None), ArgumentError, r"alpha must be a number, got None"),
    ("collect", "seed=-1", C(seed=-1), ArgumentError, r"seed must be >= 0, got -1"),
    ("collect", "seed=1.5", C(seed=1.5), ArgumentError, r"seed must be an integer, got 1.5"),
    ("collect", "seed='0'", C(seed="0"), ArgumentError, r"seed must be an integer, got '0'"),
    ("collect", "seed=True", C(seed=True), ArgumentError, r"seed must be an integer, got True"),
    ("collect", "sampler='sobol'", C(sampler="sobol"), ArgumentError, r"sampler must be one of \('bernoulli', 'exact'\)"),
    ("collect", "sampler=None", C(sampler=None), ArgumentError, r"sampler must be one of .* got None"),
    ("collect", "block_size=0", C(block_size=0), ArgumentError, r"block_size must be >= 1, got 0"),
    ("collect", "block_size=-3", C(block_size=-3), ArgumentError, r"block_size must be >= 1, got -3"),
    ("collect", "block_size=2.5", C(block_size=2.5), ArgumentError, r"block_size must be an integer"),
    ("collect", "batch_size=-1", C(batch_size=-1), ArgumentError, r"batch_size must be >= 1, got -1"),
    ("collect", "batch_size=0", C(batch_size=0), ArgumentError, r"batch_size must be >= 1, got 0"),
    ("collect", "batch_size=2.5", C(batch_size=2.5), ArgumentError, r"batch_size must be an integer, got 2.5"),
    ("collect", "batch_size='8'", C(batch_size="8"), ArgumentError, r"batch_size must be an integer, got '8'"),
    ("collect", "device='gpu0'", C(device="gpu0"), ArgumentError, r"device 'gpu0' is not a device torch knows"),
    ("collect", "device=3", C(device=3), ArgumentError, r"device must be a string .* got 3 \(int\)"),
    ("collect", "mode='max'", C(mode="max"), ArgumentError, r"mode must be one of \('zero', 'mean'\)"),
    ("collect", "mode='mean' without means", C(mode="mean"), ComponentError, r"mode='mean' needs means="),
    ("collect", "means=[1, 2]", C(means=[1, 2]), ArgumentError, r"means must be a mapping"),
    ("collect", "shard=(2, 2)", C(shard=(2, 2)), ArgumentError, r"0 <= k < K, got \(2, 2\)"),
    ("collect", "shard='0/2'", C(shard="0/2"), ArgumentError, r"shard must be a tuple \(k, K\)"),
    ("collect", "shard=(1,)", C(shard=(1,)), ArgumentError, r"shard must be a tuple \(k, K\)"),
    ("collect", "shard=(-1, 2)", C(shard=(-1, 2)), ArgumentError, r"got \(-1, 2\)"),
    ("collect", "blocks=[-1]", C(blocks=[-1]), ArgumentError, r"blocks must be block indices in 0..1"),
    ("collect", "blocks=[99]", C(blocks=[99]), ArgumentError, r"got \[99\]"),
    ("collect", "blocks=['a']", C(blocks=["a"]), ArgumentError, r"got \['a'\]"),
    ("collect", "autocast='fp8'", C(autocast="fp8"), ArgumentError, r"autocast must be one of \('bf16', 'fp16'\)"),
    ("collect", "dtype='int8'", C(dtype="int8"), ArgumentError, r"dtype must be one of \('float32', 'float16'\)"),
    ("collect", "dtype='float64'", C(dtype="float64"), ArgumentError, r"got 'float64'"),
    ("collect", "allow_nonfinite='yes'", C(allow_nonfinite="yes"), ArgumentError, r"allow_nonfinite must be True or False"),
    ("collect", "overwrite=1", C(overwrite=1), ArgumentError, r"overwrite must be True or False, got 1"),
    ("collect", "progress='no'", C(progress="no"), ArgumentError, r"progress must be True or False"),
    ("collect", "compile_model='true'", C(compile_model="true"), ArgumentError, r"compile_model must be True or False"),
    ("collect", "prefix=3", C(prefix=3), SplitError, r"prefix must be a module path \(str\) or a coarpy.prefix.Split"),
    ("collect", "output='nonexistent'", C(output="nonexistent"), ArgumentError, r"Unknown output function 'nonexistent'"),
    ("collect", "output='nomodule:fn'", C(output="nomodule:fn"), ArgumentError, r"Cannot import module 'nomodule'"),
    ("collect", "model='not a model'", C(model="not a model"), ArgumentError, r"model must be a torch.nn.Module .* got str"),
    ("collect", "components={'0': 'linear'}", C(components={"0": "linear"}), ArgumentError, r"components must be a coarpy.Components, got dict"),
    ("collect", "data=None", C(data=None), DataError, r"data must be a DataLoader, a list of batches .* got NoneType"),
    ("collect", "data='text'", C(data="text"), DataError, r"got str"),
    ("collect", "data=[]", C(data=[]), DataError, r"data yielded no batches"),
    ("collect", "data=[1, 2]", C(data=[1, 2]), DataError, r"A batch must hold at least one tensor, got int"),
    ("collect", "path=None", C(path=None), ArgumentError, r"path must be the store's directory"),
    ("collect", "labels 0.5 off", lambda k, w: C(data=(k.data[0], k.data[1].float() + 0.5))(k, w), DataError, r"non-integer value .* would truncate it"),
    ("collect", "negative labels", lambda k, w: C(data=(k.data[0], k.data[1] - 9))(k, w), DataError, r"negative value"),
    ("collect", "output of the wrong shape", C(output=_label_output), (CollectError, ArgumentError), r"returned \(48, 4\), expected shape \(48,\)"),
    ("collect", "a NaN output", C(output=_nan_output), CollectError, r"Mask row 0 gave a non-finite output \(nan\)"),
    ("collect", "device_budget=0", C(device_budget=0), ArgumentError, r"device_budget must be >= 1, got 0"),
    ("collect", "device_budget='8GB'", C(device_budget="8GB"), ArgumentError, r"device_budget must be an integer, got '8GB'"),
    ("collect", "device_budget below one batch", C(device_budget=100), ArgumentError, r"device_budget=100 bytes cannot hold one batch: 48 examples of 40 bytes each .* device_budget >= 1920"),
    ("collect", "a shuffled DataLoader", lambda k, w: C(data=_shuffled(k))(k, w), DataError, r"shuffles its examples .* shuffle=False"),
    ("collect", "a model on the meta device", lambda k, w: C(model=_on_meta(k))(k, w), ArgumentError, r"'0.weight' is on the meta device: the model was built on the meta device"),
    ("evaluate", "a model on the meta device", lambda k, w: E(model=_on_meta(k))(k, w), ArgumentError, r"is on the meta device"),
    ("leave_one_out", "a shuffled DataLoader", lambda k, w: L(data=_shuffled(k))(k, w), DataError, r"shuffles its examples"),
    ("gradient", "device_budget below one batch", L(gradient, device_budget=100), ArgumentError, r"cannot hold one batch"),
    ("collect", "another alpha on a store", lambda k, w: collect(k.model, k.comps, k.data, path=k.store.path, **{**GOOD, "alpha": 0.3}), StoreMismatchError, r"alpha: stored 0.1, given 0.3"),
    ("collect", "another model on a store", lambda k, w: collect(k.other, k.comps, k.data, path=k.store.path, **GOOD), StoreMismatchError, r"fingerprint: stored"),
    ("evaluate", "alphas=(0,)", E(alphas=(0,)), EvaluationError, r"strictly between 0 and 1 .* got 0.0"),
    ("evaluate", "alphas=(1.0,)", E(alphas=(1.0,)), EvaluationError, r"strictly between 0 and 1"),
    ("evaluate", "alphas=(1.5,)", E(alphas=(1.5,)), EvaluationError, r"got 1.5"),
    ("evaluate", "alphas=()", E(alphas=()), EvaluationError, r"alphas is empty"),
    ("evaluate", "alphas=0.05", E(alphas=0.05), EvaluationError, r"alphas must be a sequence .* alphas=\(0.05,\)"),
    ("evaluate", "alphas=(0.1, 0.1)", E(alphas=(0.1, 0.1)), EvaluationError, r"alphas has duplicates"),
    ("evaluate", "n_masks=2", E(n_masks=2), EvaluationError, r"n_masks must be an integer >= 3"),
    ("evaluate", "n_masks=2.5", E(n_masks=2.5), EvaluationError, r"n_masks must be an integer >= 3 .* got 2.5"),
    ("evaluate", "seed=-1", E(seed=-1), ArgumentError, r"seed must be >= 0, got -1"),
    ("evaluate", "sampler='sobol'", E(sampler="sobol"), EvaluationError, r"sampler must be one of"),
    ("evaluate", "mode='max'", E(mode="max"), ArgumentError, r"mode must be one of"),
    ("evaluate", "check='no'", E(check="no"), ArgumentError, r"check must be True or False"),
    ("evaluate", "attributions='x'", E(attributions="x"), EvaluationError, r"attributions must be an Attributions or a mapping"),
    ("evaluate", "attributions={}", E(attributions={}), EvaluationError, r"attributions is an empty mapping"),
    ("evaluate", "a nameless attribution", lambda k, w: E(attributions={"": k.attr})(k, w), EvaluationError, r"non-empty strings"),
    ("evaluate", "other components", lambda k, w: E(components=Components.from_spec(k.model, {"0": "linear"}))(k, w), ComponentError, r"fitted for other components"),
    ("evaluate", "other examples", lambda k, w: E(data=(k.data[0][:10], k.data[1][:10]))(k, w), EvaluationError, r"cover 48 examples, but data has 10"),
    ("evaluate", "another output function", E(output="logit"), EvaluationError, r"the output function: recorded 'margin', here 'logit'"),
    ("evaluate", "another model", lambda k, w: E(model=k.other)(k, w), EvaluationError, r"fitted on a model with other weights"),
    ("evaluate", "batch_size=0", E(batch_size=0), ArgumentError, r"batch_size must be >= 1"),
    ("evaluate", "device='gpu0'", E(device="gpu0"), ArgumentError, r"not a device torch knows"),
    ("evaluate", "autocast='fp8'", E(autocast="fp8"), ArgumentError, r"autocast must be one of"),
    ("evaluate", "progress='no'", E(progress="no"), ArgumentError, r"progress must be True or False"),
    ("evaluate_store", "a path for the store", lambda k, w: evaluate_store(k.attr, str(k.store.path)), ArgumentError, r"ds must be a ComponentDataset"),
    ("evaluate_store", "check='no'", lambda k, w: evaluate_store(k.attr, k.store, check="no"), ArgumentError, r"check must be True or False"),
    ("leave_one_out", "mode='max'", L(mode="max"), ArgumentError, r"mode must be one of"),
    ("leave_one_out", "batch_size=-1", L(batch_size=-1), ArgumentError, r"batch_size must be >= 1"),
    ("leave_one_out", "device='x'", L(device="x"), ArgumentError, r"not a device torch knows"),
    ("leave_one_out", "model=None", L(model=None), ArgumentError, r"model must be a torch.nn.Module"),
    ("leave_one_out", "data=[]", L(data=[]), DataError, r"no batches"),
    ("leave_one_out", "labels 0.5 off", lambda k, w: L(data=(k.data[0], k.data[1] + 0.5))(k, w), DataError, r"non-integer value"),
    ("gradient", "components=['0:1']", L(gradient, components=["0:1"]), ArgumentError, r"components must be a coarpy.Components, got list"),
    ("gradient", "autocast='fp8'", L(gradient, autocast="fp8"), ArgumentError, r"autocast must be one of"),
    ("gradient", "progress=1", L(gradient, progress=1), ArgumentError, r"progress must be True or False"),
    ("ComponentDataset.create", "dtype='int8'", S(dtype="int8"), ArgumentError, r"dtype must be one of \('float32', 'float16'\)"),
    ("ComponentDataset.create", "block_size=0", S(block_size=0), ArgumentError, r"block_size must be >= 1"),
    ("ComponentDataset.create", "alpha=2.0", S(alpha=2.0), ArgumentError, r"alpha is the fraction"),
    ("ComponentDataset.create", "n_examples=0", S(n_examples=0), ArgumentError, r"n_examples must be >= 1"),
    ("ComponentDataset.create", "seed=-1", S(seed=-1), ArgumentError, r"seed must be >= 0"),
    ("ComponentDataset.create", "components=[]", S(components=[]), ArgumentError, r"components must be a non-empty list of \[module, kind, n_units\]"),
    ("ComponentDataset.create", "n_units '3'", S(components=[["a", "conv", "3"]]), ArgumentError, r"\[module, kind, n_units\]"),
    ("ComponentDataset.create", "extra={'seed': 3}", S(extra={"seed": 3}), ArgumentError, r"extra may not set the store's own fields \['seed'\]"),
    ("ComponentDataset.create", "sampler='x'", S(sampler="x"), ArgumentError, r"sampler must be one of"),
    ("ComponentDataset.create", "compile_model='no'", S(compile_model="no"), ArgumentError, r"compile_model must be True or False"),
    ("ComponentDataset.create", "n_masks=-1", S(n_masks=-1), ArgumentError, r"n_masks must be >= 0"),
    ("sample_masks", "alpha=1.5", M(alpha=1.5), ArgumentError, r"alpha is the fraction .* got 1.5"),
    ("sample_masks", "sampler='uniform'", M(sampler="uniform"), ArgumentError, r"sampler must be one of"),
    ("sample_masks", "n_components=0", M(0, 2, 0), ArgumentError, r"n_components must be >= 1, got 0"),
    ("sample_masks", "start > stop", M(5, 3, 10), ArgumentError, r"0 <= start <= stop, got start=5, stop=3"),
    ("sample_masks", "seed=-1", M(seed=-1), ArgumentError, r"seed must be >= 0"),
    ("sample_masks", "stream=-1", M(stream=-1), ArgumentError, r"stream must be >= 0"),
    ("sample_masks", "start=0.5", M(0.5, 2, 10), ArgumentError, r"start must be an integer"),
    ("RunConfig", "alpha = 1.5", R(alpha=1.5), ConfigError, r"run.toml: alpha is the fraction .* got 1.5"),
    ("RunConfig", "n_masks = 0", R(n_masks=0), ConfigError, r"n_masks must be >= 1, got 0"),
    ("RunConfig", "seed = -1", R(seed=-1), ConfigError, r"seed must be >= 0"),
    ("RunConfig", "block_size = 0", R(block_size=0), ConfigError, r"block_size must be >= 1"),
    ("RunConfig", "batch_size = -1", R(batch_size=-1), ConfigError, r"batch_size must be >= 1"),
    ("RunConfig", "sampler = 'sobol'", R(sampler="sobol"), ConfigError, r"sampler must be one of"),
    ("RunConfig", "dtype = 'int8'", R(dtype="int8"), ConfigError, r"dtype must be one of"),
    ("RunConfig", "autocast = 'fp8'", R(autocast="fp8"), ConfigError, r"autocast must be one of"),
    ("RunConfig", "mode = 'mean'", R(mode="mean"), ConfigError, r"mode must be 'zero' in a run configuration"),
    ("RunConfig", "factory = 'nocolon'", R(factory="nocolon"), ConfigError, r"factory must be 'package.module:function'"),
    ("RunConfig", "factory = ''", R(factory=""), ConfigError, r"factory must be a non-empty string"),
    ("RunConfig", "device = 'gpu0'", R(device="gpu0"), ConfigError, r"not a device torch knows"),
    ("RunConfig", "kinds = 'conv'", R(kinds="conv"), ConfigError, r"kinds must be a list of strings"),
    ("RunConfig", "[components] a = 1", R(components={"a": 1}), ConfigError, r"components must be a table"),
    ("RunConfig", "compile_model = 'yes'", R(compile_model="yes"), ConfigError, r"compile_model must be True or False"),
    ("RunConfig", "factory_args = [1]", R(factory_args=[1]), ConfigError, r"factory_args must be a mapping"),
    ("RunConfig", "alfa = 0.1", R(alfa=0.1), ConfigError, r"unknown field\(s\) alfa"),
    ("RunConfig", "no n_masks", R(n_masks=None), ConfigError, r"missing required field\(s\) n_masks"),
    ("RunConfig", "n_masks = '3'", R(n_masks="3"), ConfigError, r"n_masks should be int"),
    ("RunConfig", "path = ''", R(path=""), ConfigError, r"path must be a non-empty string"),
    ("RunConfig", "output = ''", R(output=""), ConfigError, r"output must be a non-empty string"),
    ("parse_shard", "'5/2'", lambda k, w: runs.parse_shard("5/2"), ArgumentError, r"0 <= k < K, got \(5, 2\)"),
    ("parse_shard", "'a/b'", lambda k, w: runs.parse_shard("a/b"), ArgumentError, r"shard must be 'k/K'"),
    ("parse_shard", "'3'", lambda k, w: runs.parse_shard("3"), ArgumentError, r"got '3'"),
    ("parse_shard", "(1, 0)", lambda k, w: runs.parse_shard((1, 0)), ArgumentError, r"got \(1, 0\)"),
    ("parse_shard", "'-1/2'", lambda k, w: runs.parse_shard("-1/2"), ArgumentError, r"shard must be 'k/K'"),
    ("Claims", "lease_s=0", lambda k, w: Claims(w, [0], lease_s=0), ArgumentError, r"lease_s must be a positive number of seconds"),
    ("Claims", "stall_s=-1", lambda k, w: Claims(w, [0], stall_s=-1), ArgumentError, r"stall_s must be a positive number"),
    ("Claims", "max_wait_s=0", lambda k, w: Claims(w, [0], max_wait_s=0), ArgumentError, r"max_wait_s must be a positive number"),
    ("Claims", "shard=(3, 2)", lambda k, w: Claims(w, shard=(3, 2)), ArgumentError, r"0 <= k < K"),
    ("local.launch", "devices='gpu:0'", lambda k, w: local.launch(RunConfig(**{**RAW, "path": str(w)}), devices="gpu:0"), ArgumentError, r"devices must list cuda:INDEX entries or cpu:N"),
    ("local.launch", "devices='cpu:0'", lambda k, w: local.launch(RunConfig(**{**RAW, "path": str(w)}), devices="cpu:0"), ArgumentError, r"got 'cpu:0'"),
    ("local.launch", "threads=0", lambda k, w: local.launch(RunConfig(**{**RAW, "path": str(w)}), threads=0), ArgumentError, r"threads must be >= 1"),
    ("local.launch", "restarts=-1", lambda k, w: local.launch(RunConfig(**{**RAW, "path": str(w)}), restarts=-1), ArgumentError, r"restarts must be an int >= 0"),
    ("local.launch", "poll_s=0", lambda k, w: local.launch(RunConfig(**{**RAW, "path": str(w)}), poll_s=0), ArgumentError, r"poll_s must be a positive number"),
    ("runs.launch", "launcher='k8s'", lambda k, w: runs.launch(RunConfig(**{**RAW, "path": str(w)}), "k8s"), ArgumentError, r"launcher must be one of local, slurm, ray"),
    ("runs.collect_run", "claim='yes'", lambda k, w: runs.collect_run(RunConfig(**{**RAW, "path": str(w)}), claim="yes"), ArgumentError, r"claim must be True or False"),
    ("runs.collect_run", "lease_s=-5", lambda k, w: runs.collect_run(RunConfig(**{**RAW, "path": str(w)}), lease_s=-5), ArgumentError, r"lease_s must be a positive number"),
    ("coar status", "a folder with no run", CLI("status", "WHERE"), SystemExit, r"2"),
    ("coar collect", "--shard 5/2", CLI("collect", "WHERE", "--shard", "5/2"), SystemExit, r"2"),
    ("coar verify", "a folder with no run", CLI("verify", "WHERE"), SystemExit, r"2"),
    ("coar evaluate", "--n-masks many", CLI("evaluate", "WHERE", "--n-masks", "many"), SystemExit, r"2"),
]  # fmt: skip


def _run(k, index: int) -> BaseException:
    entry, bad, call, error, match = ROWS[index]
    where = k.fresh(f"row{index}")
    with pytest.raises(error, match=match) as caught:
        call(k, where)
    if error is SystemExit:
        assert caught.value.code == 2
    if entry == "collect" and error in (ArgumentError, DataError, SplitError, ComponentError):
        # refused at the door
        assert not where.exists(), f"{bad}: something was written before the check"
    return caught.value


@pytest.mark.parametrize("index", range(len(ROWS)), ids=[f"{r[0]}: {r[1]}" for r in ROWS])
def test_a_bad_input_is_refused_with_a_clear_error(k, index, capsys):
    _run(k, index)
    if ROWS[index][3] is SystemExit:
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_the_table_of_bad_inputs_is_large_and_recorded(k, capsys):
    assert len(ROWS) >= 100
    lines = []
    for index, (entry, bad, _, error, _) in enumerate(ROWS):
        raised = _run(k, index)
        if error is SystemExit:
            message = f"exit 2: {capsys.readouterr().err.strip()}"
        else:
            message = f"{type(raised).__name__}: {raised}"
        message = message.replace("|", "\\|").replace("\n", " ")
        message = message.replace(str(k.tmp), "TMP")
        lines.append(
            f"| `{entry}` | `{bad}` | {message[:160]}{'...' if len(message) > 160 else ''} |"
        )
    record(
        "inputs",
        f"""
## Bad inputs and their errors (tests/test_reliability_inputs.py)

{len(ROWS)} bad inputs to every public entry point, each refused with the library's
error type and a message that names the argument, the value and the fix (messages cut
at 160 characters here). Rows for `collect` also check that nothing was written.

| entry point | bad input | error and message |
|---|---|---|
"""
        + "\n".join(lines),
    )
