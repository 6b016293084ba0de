"""Collection: what lands in the store is what the ablated model computes, however the
work is packed, sharded or interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coarpy import outputs
from coarpy.ablation import ablate, mean_values
from coarpy.collect import collect
from coarpy.components import Components
from coarpy.errors import ArgumentError, CollectError, DataError, StoreMismatchError
from coarpy.masks import sample_masks
from coarpy.store import ComponentDataset

WORKER = Path(__file__).with_name("_kill_worker.py")


def block_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((path / "blocks").glob("*.blk"))}


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = max(want.abs().max().item(), 1e-12)
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def examples(digits):
    _, _, x, y = digits
    return x[:100], y[:100]


@pytest.fixture(scope="module")
def comps(trained_cnn):
    return Components.discover(trained_cnn, kinds=("conv", "linear"))


# -- the store holds what the ablated model computes ------------------------------


def test_stored_outputs_equal_direct_evaluation_under_ablate(
    tmp_path, trained_cnn, comps, examples
):
    ds = collect(
        trained_cnn,
        comps,
        examples,
        path=tmp_path / "run",
        n_masks=6,
        alpha=0.1,
        seed=4,
        block_size=4,
        progress=False,
    )
    assert len(ds) == 6 and ds.meta["output"] == "margin"
    assert torch.equal(ds.masks(), sample_masks(0, 6, len(comps), alpha=0.1, seed=4))
    stored = ds.outputs()
    for row in (0, 3, 5):
        keep = ds.masks()[row]
        with torch.no_grad(), ablate(trained_cnn, comps, keep):
            direct = outputs.margin(trained_cnn, examples)
        assert_close(stored[row], direct)
    # the masks matter: rows differ from one another
    assert (stored[0] - stored[5]).abs().max() > 0.1


def test_a_dataloader_gives_the_same_store_as_a_tensor_tuple(
    tmp_path, trained_cnn, comps, examples
):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*examples), batch_size=16)
    kwargs = {"n_masks": 3, "alpha": 0.2, "seed": 0, "block_size": 3, "progress": False}
    a = collect(trained_cnn, comps, loader, path=tmp_path / "a", **kwargs)
    b = collect(trained_cnn, comps, examples, path=tmp_path / "b", batch_size=16, **kwargs)
    assert a.meta["data_fingerprint"] == b.meta["data_fingerprint"]
    assert block_bytes(tmp_path / "a") == block_bytes(tmp_path / "b")


def test_packed_masks_equal_one_mask_per_pass(tmp_path, trained_cnn, comps, examples):
    x, y = examples[0][:20], examples[1][:20]
    kwargs = {"n_masks": 12, "alpha": 0.2, "seed": 1, "block_size": 5, "progress": False}
    # 100 examples per pass: 5 masks share each forward pass (12 = 5 + 5 + 2)
    packed = collect(trained_cnn, comps, (x, y), path=tmp_path / "p", batch_size=100, **kwargs)
    single = collect(trained_cnn, comps, (x, y), path=tmp_path / "s", batch_size=20, **kwargs)
    assert torch.equal(packed.masks(), single.masks())
    assert_close(packed.outputs(), single.outputs())


def test_multihead_attention_models_collect_with_large_batches(tmp_path, attention_net):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 6, 16, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    comps = Components.discover(attention_net, kinds=("heads", "linear"))
    kwargs = {"n_masks": 6, "alpha": 0.3, "seed": 0, "block_size": 3, "progress": False}
    big = collect(attention_net, comps, (x, y), path=tmp_path / "big", batch_size=50, **kwargs)
    small = collect(attention_net, comps, (x, y), path=tmp_path / "small", **kwargs)
    assert_close(big.outputs(), small.outputs())
    keep = big.masks()[2]
    with torch.no_grad(), ablate(attention_net, comps, keep):
        direct = outputs.margin(attention_net, (x, y))
    assert_close(big.outputs()[2], direct)


def test_mean_mode_stores_mean_ablations_and_refuses_other_means(
    tmp_path, trained_cnn, comps, examples
):
    means = mean_values(trained_cnn, comps, examples)
    kwargs = {"n_masks": 4, "alpha": 0.2, "seed": 0, "block_size": 2, "progress": False}
    ds = collect(
        trained_cnn, comps, examples, path=tmp_path / "r", mode="mean", means=means, **kwargs
    )
    keep = ds.masks()[1]
    with torch.no_grad(), ablate(trained_cnn, comps, keep, mode="mean", means=means):
        direct = outputs.margin(trained_cnn, examples)
    assert_close(ds.outputs()[1], direct)
    other = {k: v + 1 for k, v in means.items()}
    with pytest.raises(StoreMismatchError, match=r"means_fingerprint"):
        collect(
            trained_cnn, comps, examples, path=tmp_path / "r", mode="mean", means=other, **kwargs
        )
    with pytest.raises(StoreMismatchError, match=r"mode: stored \"mean\", given \"zero\""):
        collect(trained_cnn, comps, examples, path=tmp_path / "r", **kwargs)


# -- sharding ---------------------------------------------------------------------


def test_two_shards_write_the_same_store_as_one_worker(tmp_path, trained_cnn, comps, examples):
    kwargs = {"n_masks": 10, "alpha": 0.1, "seed": 2, "block_size": 2, "progress": False}
    first = collect(trained_cnn, comps, examples, path=tmp_path / "two", shard=(0, 2), **kwargs)
    assert first.done_blocks() == [0, 2, 4]
    collect(trained_cnn, comps, examples, path=tmp_path / "two", shard=(1, 2), **kwargs)
    collect(trained_cnn, comps, examples, path=tmp_path / "one", **kwargs)
    assert block_bytes(tmp_path / "two") == block_bytes(tmp_path / "one")
    assert len(block_bytes(tmp_path / "one")) == 5
    metas = [json.loads((tmp_path / d / "meta.json").read_text()) for d in ("two", "one")]
    for meta in metas:
        meta.pop("created")
    assert metas[0] == metas[1]


@pytest.mark.parametrize(
    ("shard", "match"),
    [
        ((2, 2), r"shard must be \(k, K\) with 0 <= k < K, got \(2, 2\)"),
        ((-1, 2), r"got \(-1, 2\)"),
        ((1, 0), r"0 <= k < K, got \(1, 0\)"),
        ((1.0, 2), r"shard must be a tuple \(k, K\).*got \(1.0, 2\)"),
        ("1/2", r"shard must be a tuple \(k, K\).*got '1/2'.*coarpy.runs.collect_run"),
        ("env", r"got 'env'.*SLURM/torchrun variables use coarpy.runs.collect_run"),
    ],
)
def test_bad_shards_are_refused(tmp_path, trained_cnn, comps, examples, shard, match):
    with pytest.raises(ArgumentError, match=match):
        collect(
            trained_cnn,
            comps,
            examples,
            path=tmp_path / "r",
            n_masks=2,
            alpha=0.1,
            shard=shard,
            progress=False,
        )


def test_blocks_from_an_iterator_are_asked_for_one_at_a_time(
    tmp_path, trained_cnn, comps, examples
):
    """A lazy iterable (a lease claimer) is asked for a block only when collect is
    ready for it, and blocks it hands out that are done by then are skipped."""
    path, seen = tmp_path / "r", []

    def hand_out():
        for b in (3, 1, 3):
            seen.append(sorted(p.name for p in (path / "blocks").glob("*.blk")))
            yield b

    kwargs = {"n_masks": 8, "alpha": 0.1, "block_size": 2, "progress": False}
    ds = collect(trained_cnn, comps, examples, path=path, blocks=hand_out(), **kwargs)
    assert ds.done_blocks() == [1, 3]
    assert seen[0] == [] and "b000003.blk" in seen[2]  # block 3 was written before the ask
    with pytest.raises(ArgumentError, match=r"block indices in 0\.\.3.*got \[4\]"):
        collect(trained_cnn, comps, examples, path=path, blocks=iter([0, 4]), **kwargs)


# -- failures ---------------------------------------------------------------------


class NaNAt:
    """The margin, but NaN at one (call, example): call i is mask row i when one
    forward pass evaluates one mask on all the examples."""

    def __init__(self, call: int, example: int):
        self.call, self.example, self.calls = call, example, 0

    def __call__(self, model, batch):
        values = outputs.margin(model, batch)
        if self.calls == self.call:
            values[self.example] = float("nan")
        self.calls += 1
        return values


def test_a_nan_output_stops_collection_naming_row_and_example(
    tmp_path, trained_cnn, comps, examples
):
    with pytest.raises(
        CollectError,
        match=r"Mask row 4 gave a non-finite output \(nan\) on "
        r"example 7.*allow_nonfinite=True",
    ):
        collect(
            trained_cnn,
            comps,
            examples,
            output=NaNAt(4, 7),
            path=tmp_path / "r",
            n_masks=6,
            alpha=0.1,
            block_size=3,
            progress=False,
        )
    ds = ComponentDataset(tmp_path / "r")
    assert ds.done_blocks() == [0]  # the block with the NaN was not committed


def test_allow_nonfinite_stores_the_nan(tmp_path, trained_cnn, comps, examples):
    ds = collect(
        trained_cnn,
        comps,
        examples,
        output=NaNAt(4, 7),
        path=tmp_path / "r",
        n_masks=6,
        alpha=0.1,
        block_size=3,
        allow_nonfinite=True,
        progress=False,
    )
    y = ds.outputs()
    assert torch.isnan(y[4, 7]) and torch.isfinite(y).sum() == y.numel() - 1
    assert ds.meta["output"].endswith(":NaNAt")


def test_an_error_inside_a_block_names_the_block(tmp_path, trained_cnn, comps, examples):
    def broken(model, batch):
        raise RuntimeError("boom")

    with pytest.raises(
        CollectError, match=r"Block 0 \(mask rows 0..2\) failed: RuntimeError: boom"
    ) as info:
        collect(
            trained_cnn,
            comps,
            examples,
            output=broken,
            path=tmp_path / "r",
            n_masks=3,
            alpha=0.1,
            block_size=3,
            progress=False,
        )
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in trained_cnn.modules())


def test_an_output_of_the_wrong_shape_is_reported(tmp_path, trained_cnn, comps, examples):
    # the output function breaks its contract on every block: no block to name
    with pytest.raises(ArgumentError, match=r"returned \(\), expected shape \(100,\)"):
        collect(
            trained_cnn,
            comps,
            examples,
            output=lambda m, b: outputs.margin(m, b).sum(),
            path=tmp_path / "r",
            n_masks=1,
            alpha=0.1,
            progress=False,
        )


def test_no_data_and_bad_autocast_are_refused(tmp_path, trained_cnn, comps):
    with pytest.raises(ValueError, match=r"data yielded no batches"):
        collect(trained_cnn, comps, [], path=tmp_path / "r", n_masks=1, alpha=0.1)
    with pytest.raises(ValueError, match=r"autocast must be one of \('bf16', 'fp16'\)"):
        collect(trained_cnn, comps, [], path=tmp_path / "r", n_masks=1, alpha=0.1, autocast="fp8")


def test_training_mode_is_warned_about_and_restored(tmp_path, cnn, comps, examples):
    kwargs = {"n_masks": 2, "alpha": 0.1, "block_size": 2, "progress": False}
    reference = collect(cnn, comps, examples, path=tmp_path / "eval", **kwargs)
    cnn.train()
    with pytest.warns(UserWarning, match=r"training mode; collect runs it in eval mode"):
        ds = collect(cnn, comps, examples, path=tmp_path / "train", **kwargs)
    assert cnn.training and all(m.training for m in cnn.modules())
    assert torch.equal(ds.outputs(), reference.outputs())


# -- dict batches (a transformer with attention masks) ----------------------------

DIRECTION = torch.linspace(-1.0, 1.0, 384)


def pooled_projection(model, batch):
    """Mean of the real tokens' final states, projected on a fixed direction."""
    mask = batch["attention_mask"]
    states = model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return pooled @ DIRECTION


def _trimmed(batch: dict, rows: slice) -> dict:
    part = {k: v[rows] for k, v in batch.items()}
    width = int(part["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in part.items()}


def test_dict_batches_of_a_transformer(tmp_path, minilm, minilm_batch):
    heads = Components.discover(minilm, kinds=("heads",))
    # two batches padded to different widths: collect pads them to one
    data = [_trimmed(minilm_batch, slice(0, 3)), _trimmed(minilm_batch, slice(3, 6))]
    assert data[0]["input_ids"].shape[1] != data[1]["input_ids"].shape[1]
    kwargs = {"n_masks": 4, "alpha": 0.2, "seed": 0, "block_size": 2, "progress": False}
    single = collect(minilm, heads, data, output=pooled_projection, path=tmp_path / "s", **kwargs)
    packed = collect(
        minilm, heads, data, output=pooled_projection, path=tmp_path / "p", batch_size=12, **kwargs
    )
    assert single.n_examples == 6
    assert_close(packed.outputs(), single.outputs())
    for row in (0, 3):
        with torch.no_grad(), ablate(minilm, heads, single.masks()[row]):
            direct = pooled_projection(minilm, minilm_batch)
        assert_close(single.outputs()[row], direct)
    assert (single.outputs()[0] - single.outputs()[3]).abs().max() > 1e-3


# -- a killed worker --------------------------------------------------------------


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_store(tmp_path, trained_cnn, examples):
    """A worker killed with SIGKILL leaves only whole blocks; resuming in-process
    completes a store identical, byte for byte, to an uninterrupted run."""
    model_file, data_file = tmp_path / "model.pt", tmp_path / "data.pt"
    torch.save(trained_cnn, model_file)
    torch.save(examples, data_file)
    store = tmp_path / "killed"
    settings = {"n_masks": 60, "alpha": 0.1, "seed": 7, "block_size": 2}
    env = {**os.environ, "COAR_TEST_DELAY": "0.1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            str(model_file),
            str(data_file),
            str(store),
            json.dumps(settings),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    blocks_dir = store / "blocks"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (store / "meta.json").exists():
                # a reader during the run sees only whole, verified blocks
                live = ComponentDataset(store)
                assert live.verify() == []
                if len(live.done_blocks()) >= 2:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    names = sorted(p.name for p in blocks_dir.iterdir())
    finished = [n for n in names if n.startswith("b") and n.endswith(".blk")]
    assert 2 <= len(finished) < 30, names  # killed mid-run
    assert all(n.startswith(".") and n.endswith(".tmp") for n in set(names) - set(finished))
    # a half-written temporary file, as a kill during a write leaves it
    (blocks_dir / f".b{29:06d}.blk.99999.1.tmp").write_bytes(b"COARBLK1" + b"\0" * 40)
    interrupted = ComponentDataset(store)
    assert interrupted.verify() == []
    assert len(interrupted) == 2 * len(finished)
    comps = Components.discover(trained_cnn, kinds=("conv",))
    keep = torch.cat([k for _, k, _ in interrupted.iter_blocks()])
    assert torch.equal(keep, sample_masks(0, 60, 24, alpha=0.1, seed=7)[interrupted.rows()])

    resumed = collect(trained_cnn, comps, examples, path=store, progress=False, **settings)
    uninterrupted = collect(
        trained_cnn, comps, examples, path=tmp_path / "whole", progress=False, **settings
    )
    assert len(resumed) == len(uninterrupted) == 60
    assert block_bytes(store) == block_bytes(tmp_path / "whole")


def test_exact_size_masks_come_with_a_warning_but_are_collected(
    tmp_path, trained_cnn, comps, examples
):
    with pytest.warns(UserWarning, match="cannot be told apart from the bias"):
        ds = collect(
            trained_cnn, comps, examples, path=tmp_path / "s", n_masks=4, alpha=0.25,
            sampler="exact", block_size=2, progress=False,
        )  # fmt: skip
    assert (~ds.masks()).sum(1).tolist() == [round(0.25 * len(comps))] * 4


# -- validation at the door: nothing is written before the inputs are valid (issue #16) -------


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"seed": -1}, r"seed must be >= 0, got -1"),
        ({"batch_size": -1}, r"batch_size must be >= 1, got -1"),
        ({"batch_size": 0}, r"batch_size must be >= 1, got 0"),
        ({"batch_size": 2.5}, r"batch_size must be an integer, got 2.5 \(float\)"),
        ({"n_masks": 0}, r"n_masks must be >= 1, got 0"),
        ({"alpha": 1.5}, r"alpha is the fraction of components ablated .* got 1.5"),
        ({"block_size": 0}, r"block_size must be >= 1"),
        ({"dtype": "float64"}, r"dtype must be one of \('float32', 'float16'\)"),
        ({"mode": "max"}, r"mode must be one of \('zero', 'mean'\)"),
        ({"device": "gpu0"}, r"device 'gpu0' is not a device torch knows"),
    ],
)
@pytest.mark.parametrize("as_loader", [False, True])
def test_bad_arguments_are_refused_before_anything_is_written(
    tmp_path, trained_cnn, comps, examples, bad, match, as_loader
):
    data = examples
    if as_loader:  # a list of batches, as a DataLoader yields them
        data = [(examples[0][i : i + 25], examples[1][i : i + 25]) for i in range(0, 100, 25)]
    settings = {"n_masks": 4, "alpha": 0.1, "seed": 0, "block_size": 2, **bad}
    with pytest.raises(ArgumentError, match=match):
        collect(trained_cnn, comps, data, path=tmp_path / "run", progress=False, **settings)
    assert not (tmp_path / "run").exists()
    # the store is not poisoned: the same directory then works with good settings
    good = {"n_masks": 4, "alpha": 0.1, "seed": 0, "block_size": 2}
    assert len(collect(trained_cnn, comps, data, path=tmp_path / "run", progress=False, **good))


def test_float16_outputs_beyond_its_range_stop_collection(tmp_path, trained_cnn, comps, examples):
    def huge(model, batch):
        return outputs.margin(model, batch) * 1e6

    settings = {"n_masks": 2, "alpha": 0.1, "block_size": 2, "output": huge, "dtype": "float16"}
    with pytest.raises(CollectError, match=r"beyond float16's range .* dtype='float32'"):
        collect(trained_cnn, comps, examples, path=tmp_path / "a", progress=False, **settings)
    assert ComponentDataset(tmp_path / "a").done_blocks() == []
    ds = collect(
        trained_cnn, comps, examples, path=tmp_path / "b", progress=False,
        allow_nonfinite=True, **settings,
    )  # fmt: skip
    assert torch.isinf(ds.outputs()).any()


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (lambda y: y.float() + 0.5, r"non-integer value \(\d\.5 at position 0\).*truncate"),
        (lambda y: y - 1 - y.max(), r"negative value"),
    ],
)
def test_labels_a_class_output_would_misread_are_refused(
    tmp_path, trained_cnn, comps, examples, labels, match
):
    x, y = examples
    with pytest.raises(DataError, match=match):
        collect(trained_cnn, comps, (x, labels(y)), path=tmp_path / "r", n_masks=2, alpha=0.1,
                progress=False)  # fmt: skip
    assert not (tmp_path / "r").exists()
    # integral float labels are read exactly
    ds = collect(trained_cnn, comps, (x, y.float()), path=tmp_path / "f", n_masks=2, alpha=0.1,
                 progress=False)  # fmt: skip
    ref = collect(trained_cnn, comps, (x, y), path=tmp_path / "i", n_masks=2, alpha=0.1,
                  progress=False)  # fmt: skip
    assert torch.equal(ds.outputs(), ref.outputs())
