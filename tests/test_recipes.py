"""The paper's setups by name (coarpy.recipes): counts, data, errors, and a run of each.

Every recipe runs here with random weights and random inputs of the real shapes: the
exact component count, one block collected and equal to the paper's ablation (a copy
of the model with the weights zeroed), and fit and evaluate on it. torchvision cannot
be installed beside this torch, so the ImageNet recipes run on stand-ins of
torchvision's ResNet-50 and ViT-B/16 (tests/_torchvision_standins.py: the same module
tree and forward pass), put where the recipes import torchvision from. The file
readers are tested on small files in the real formats; no real data set is read.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coarpy import apply_ablation, outputs
from coarpy.collect import collect
from coarpy.errors import (
    ArgumentError,
    DatasetFormatError,
    DatasetNotFoundError,
    MissingExtraError,
)
from coarpy.evaluate import evaluate
from coarpy.recipes import (
    SETUPS,
    MiniResNet,
    cifar10,
    cifar10_resnet,
    imagenet_margin,
    imagenet_resnet50,
    imagenet_val,
    imagenet_vit_b16,
    run_config,
    tinystories,
    tinystories_gpt2,
    train_mini_resnet,
)
from coarpy.recipes.cifar import normalize
from coarpy.recipes.gpt2 import tokenize
from coarpy.regression import fit
from coarpy.runs import collect_run

sys.path.insert(0, str(Path(__file__).parent))
import _torchvision_standins as standins  # noqa: E402

sys.path.remove(str(Path(__file__).parent))

_ENV = (
    "COARPY_CIFAR10", "COARPY_CIFAR10_WEIGHTS", "COARPY_IMAGENET_VAL",
    "COARPY_RESNET50_WEIGHTS", "COARPY_VIT_B16_WEIGHTS", "COARPY_TINYSTORIES", "COARPY_GPT2",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _no_data_in_the_environment(monkeypatch, tmp_path):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    monkeypatch.setenv("COARPY_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def torchvision(monkeypatch):
    """torchvision's models, as stand-ins (torchvision is not installed here)."""
    fake = standins.fake_torchvision()
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    return fake


def _run_one_block(setup: dict, tmp_path: Path, *, n_masks: int = 4) -> None:
    """Collect one block, check it against zeroed weights, then fit and evaluate."""
    model, comps, data = setup["model"], setup["components"], setup["data"]
    output = outputs.resolve(setup["output"])
    ds = collect(
        model, comps, data, output=output, path=tmp_path / "store", n_masks=n_masks,
        alpha=setup["alpha"], block_size=n_masks, seed=0, progress=False,
    )  # fmt: skip
    assert ds.outputs().shape == (n_masks, ds.n_examples)
    # The paper's ablation: a copy of the model with the ablated weights zeroed.
    zeroed = apply_ablation(model, comps, ds.masks()[1])
    with torch.inference_mode():
        direct = torch.cat([output(zeroed, batch) for batch in data])
        full = torch.cat([output(model, batch) for batch in data])
    torch.testing.assert_close(ds.outputs()[1], direct, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ds.outputs()[1], full)  # the mask did something
    attr = fit(ds, method="ridge", solver="cg", l2_grid=(1e-2,), progress=False)
    assert attr.weights.shape == (ds.n_examples, len(comps))
    res = evaluate(
        attr, model, comps, data, output=output, alphas=(setup["alpha"],), n_masks=3,
        progress=False,
    )  # fmt: skip
    assert res.summary()


# -- the table ---------------------------------------------------------------------------


def test_the_table_names_four_setups_with_the_papers_numbers():
    counts = {name: s.components for name, s in SETUPS.items()}
    assert counts == {
        "cifar10_resnet": 2_304,
        "imagenet_resnet50": 22_720,
        "imagenet_vit_b16": 82_944,
        "tinystories_gpt2": 64_512,
    }
    assert SETUPS["imagenet_vit_b16"].n_masks < SETUPS["imagenet_vit_b16"].components
    assert SETUPS["tinystories_gpt2"].alpha == 0.025


def test_run_config_writes_the_papers_alpha_and_masks():
    cfg = run_config("imagenet_vit_b16", "runs/vit", data_dir=Path("/data/val"))
    assert (cfg.factory, cfg.n_masks, cfg.alpha) == ("coarpy.recipes:imagenet_vit_b16", 5000, 0.05)
    assert cfg.factory_args == {"data_dir": "/data/val"}
    with pytest.raises(ArgumentError, match="Unknown setup 'vit'.*imagenet_vit_b16"):
        run_config("vit", "runs/vit")


# -- A: CIFAR-10 MiniResNet ---------------------------------------------------------------


def test_cifar10_resnet_has_9_convs_of_256_filters():
    setup = cifar10_resnet(random_weights=True, n_examples=3, batch_size=2)
    comps = setup["components"]
    assert len(comps) == 2_304
    assert [g.n_units for g in comps.groups] == [256] * 9
    assert comps.names[256] == "layer.0.conv1:0"
    (x, y), (x2, _) = setup["data"]  # batches of 2 and 1
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (2,)
    assert x2.shape == (1, 3, 32, 32)
    assert (setup["alpha"], setup["n_masks"], setup["output"]) == (0.05, 50_000, "margin")


@pytest.mark.slow  # 9 convs of 256 filters at 32×32 on the CPU (~8 s)
def test_cifar10_resnet_one_block_equals_zeroed_weights_and_fits(tmp_path):
    setup = cifar10_resnet(random_weights=True, n_examples=3, batch_size=2)
    _run_one_block(setup, tmp_path)


def test_cifar10_resnet_runs_from_its_run_configuration(tmp_path):
    cfg = run_config("cifar10_resnet", tmp_path / "run", random_weights=True, n_examples=2)
    ds = collect_run(dataclasses.replace(cfg, n_masks=2, block_size=2), progress=False)
    assert len(ds) == 2 and ds.meta["output"] == "margin"
    assert ds.n_components == 2_304 and len(ds.meta["components"]) == 9


def _write_cifar(folder: Path, split: str, x: np.ndarray, y: np.ndarray, *, binary: bool):
    names = {"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]}[split]
    for i, name in enumerate(names):
        part = slice(i * len(x) // len(names), (i + 1) * len(x) // len(names))
        if binary:
            rows = np.concatenate([y[part, None].astype(np.uint8), x[part].reshape(-1, 3072)], 1)
            rows.tofile(folder / f"{name}.bin")
        else:
            raw = {b"data": x[part].reshape(-1, 3072), b"labels": y[part].tolist()}
            (folder / name).write_bytes(pickle.dumps(raw, protocol=2))


@pytest.mark.parametrize("binary", [False, True], ids=["python", "binary"])
def test_cifar10_reads_both_official_formats(tmp_path, binary):
    folder = tmp_path / ("cifar-10-batches-bin" if binary else "cifar-10-batches-py")
    folder.mkdir()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, 5)
    _write_cifar(folder, "test", x, y, binary=binary)
    images, labels = cifar10("test", tmp_path)
    assert images.dtype == torch.uint8 and torch.equal(images, torch.from_numpy(x))
    assert labels.tolist() == y.tolist()


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())  # by name, whatever patches builtins (Ray patches print)

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DatasetFormatError, match=r"refusing to load (os|posix)\.getcwd"):
        cifar10("test", tmp_path)


def test_cifar10_without_data_says_where_to_get_it():
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-python.tar.gz.*COARPY_CIFAR10"):
        cifar10_resnet()


def test_cifar10_resnet_without_weights_says_how_to_train(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_cifar(
        folder, "test", np.zeros((2, 3, 32, 32), np.uint8), np.zeros(2, np.int64), binary=False
    )
    with pytest.raises(DatasetNotFoundError, match=r"No trained MiniResNet.*train=True"):
        cifar10_resnet(data_dir=tmp_path)


def test_cifar10_resnet_trains_saves_and_loads_its_weights(tmp_path, monkeypatch):
    # train=True: the trained weights are saved, then loaded. (Training the full-width
    # model is too slow for a test: a stand-in trainer returns a fresh one.)
    import coarpy.recipes.cifar as cifar

    calls = []

    def fake_train(data_dir, *, seed, device):
        calls.append((Path(data_dir), seed, device))
        torch.manual_seed(7)
        return MiniResNet().eval()

    monkeypatch.setattr(cifar, "train_mini_resnet", fake_train)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("test", 5), ("train", 10)):
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        _write_cifar(folder, split, x, rng.integers(0, 10, n), binary=False)
    weights = tmp_path / "mini.pt"
    trained = cifar10_resnet(data_dir=tmp_path, weights=weights, train=True, device="cpu")
    assert weights.is_file() and calls == [(tmp_path, 0, "cpu")]
    loaded = cifar10_resnet(data_dir=tmp_path, weights=weights)
    assert len(calls) == 1
    saved = loaded["model"].state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in trained["model"].state_dict().items())
    assert loaded["data"][0][0].shape == (5, 3, 32, 32)


def test_train_mini_resnet_learns_a_separable_toy_set():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(8) % 2
    x = torch.full((8, 3, 32, 32), 60, dtype=torch.uint8)
    x[y == 1] = 200  # two flat colours: trivially separable
    x = (x.int() + torch.randint(-5, 5, x.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    net = train_mini_resnet(
        train_data=(x, y), epochs=15, lr=1e-2, batch_size=8, device="cpu", width=8, n_blocks=1
    )
    with torch.inference_mode():
        assert (net(normalize(x)).argmax(1) == y).float().mean() >= 0.75


# -- B and C: torchvision's ResNet-50 and ViT-B/16 ----------------------------------------------


def test_imagenet_recipes_without_torchvision_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision fails
    with pytest.raises(MissingExtraError, match=r"torchvision.*coarpy\[vision\]"):
        imagenet_resnet50(random_weights=True, n_examples=1)


def test_imagenet_resnet50_has_22720_filters(torchvision):
    setup = imagenet_resnet50(random_weights=True, n_examples=2)
    assert len(setup["components"]) == 22_720
    ((x, y),) = setup["data"]
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.uint8 and y.max() < 1000
    assert setup["output"] is imagenet_margin
    assert (setup["alpha"], setup["n_masks"]) == (0.05, 100_000)


def test_imagenet_vit_b16_has_82944_rows(torchvision):
    with torch.device("meta"):  # shapes only
        model = standins.vit_b_16()
    setup = imagenet_vit_b16(model=model, random_weights=True, n_examples=2)
    comps = setup["components"]
    assert len(comps) == 82_944
    assert sum(g.site == "param" for g in comps.groups) == 12  # one per attention
    assert (setup["alpha"], setup["n_masks"]) == (0.05, 5_000)


def test_imagenet_weights_missing_say_what_to_download(torchvision):
    with pytest.raises(
        DatasetNotFoundError,
        match=r"resnet50-0676ba61.pth.*download.pytorch.org/models/resnet50-0676ba61.pth"
        r".*COARPY_RESNET50_WEIGHTS",
    ):
        imagenet_resnet50(n_examples=1)


def test_imagenet_weights_are_read_from_torch_hubs_cache(torchvision, tmp_path):
    torch.manual_seed(3)
    reference = standins.resnet50()
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(reference.state_dict(), hub / "resnet50-0676ba61.pth")
    with pytest.raises(DatasetNotFoundError, match="ImageNet validation set not found"):
        imagenet_resnet50()  # the weights load; then the images are missing
    val = _imagenet_folder(tmp_path / "val", per_class={0: 1, 3: 1})
    setup = imagenet_resnet50(data_dir=val)
    loaded = setup["model"].state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in reference.state_dict().items())


def _imagenet_folder(root: Path, per_class: dict[int, int], size=(300, 200)) -> Path:
    from PIL import Image

    for c in range(1000):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class.get(c, 0)):
            colour = (c % 256, (10 * i) % 256, 128)
            Image.new("RGB", size, colour).save(folder / f"img_{i}.JPEG", quality=100)
    return root


def test_imagenet_val_reads_class_folders_in_imagefolder_order(tmp_path):
    root = _imagenet_folder(tmp_path / "val", per_class={0: 2, 5: 1, 999: 2})
    x, y = imagenet_val(root, progress=False)
    assert x.shape == (5, 3, 224, 224) and x.dtype == torch.uint8
    assert y.tolist() == [0, 0, 5, 999, 999]
    # A flat colour survives resizing and cropping (JPEG may move it by a level or two).
    assert (x[2, 0].float() - 5).abs().max() <= 3 and (x[2, 2].float() - 128).abs().max() <= 3
    every, _ = imagenet_val(root, every=2, progress=False)
    assert torch.equal(every, x[::2])
    cached, _ = imagenet_val(root, cache_dir=tmp_path / "cache", progress=False)
    again, _ = imagenet_val(root, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(cached, x) and torch.equal(again, x)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_imagenet_val_refuses_a_flat_folder(tmp_path):
    (tmp_path / "val" / "images").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match=r"1 class folders, expected 1,000.*valprep"):
        imagenet_val(tmp_path / "val")


def test_imagenet_margin_is_the_margin_on_normalised_pixels():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    pixels = torch.randint(0, 256, (3, 3, 2, 2), dtype=torch.uint8)
    y = torch.tensor([0, 3, 1])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = outputs.margin(net, ((pixels / 255 - mean) / std, y))
    torch.testing.assert_close(imagenet_margin(net, (pixels, y)), expected)
    torch.testing.assert_close(imagenet_margin(net, (pixels.float(), y)), expected)


@pytest.mark.slow  # ResNet-50 at 224×224 on the CPU
def test_imagenet_resnet50_one_block_equals_zeroed_weights_and_fits(torchvision, tmp_path):
    setup = imagenet_resnet50(random_weights=True, n_examples=2)
    _run_one_block(setup, tmp_path)


@pytest.mark.slow  # ViT-B/16 at 224×224 on the CPU
def test_imagenet_vit_b16_one_block_equals_zeroed_weights_and_fits(torchvision, tmp_path):
    setup = imagenet_vit_b16(random_weights=True, n_examples=2)
    assert len(setup["components"]) == 82_944
    _run_one_block(setup, tmp_path)


# -- D: GPT-2 small on TinyStories -----------------------------------------------------------


try:
    import transformers
except ImportError:  # pragma: no cover
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers")


@needs_transformers
@pytest.mark.slow  # GPT-2 small (124M parameters) on the CPU
def test_tinystories_gpt2_one_block_equals_zeroed_weights_and_fits(tmp_path):
    setup = tinystories_gpt2(random_weights=True, n_examples=2, max_length=8)
    assert len(setup["components"]) == 64_512
    assert setup["data"][0]["input_ids"].shape == (2, 8)
    assert (setup["alpha"], setup["n_masks"], setup["output"]) == (0.025, 100_000, "token_margin")
    _run_one_block(setup, tmp_path)


STORIES = [f"Story number {i}. The cat sat." for i in range(6)]


def test_tinystories_reads_the_text_file_and_keeps_the_last_stories(tmp_path):
    (tmp_path / "TinyStories-valid.txt").write_text(
        "\n<|endoftext|>\n".join(STORIES) + "\n<|endoftext|>\n"
    )
    assert tinystories(tmp_path, n_examples=2) == STORIES[-2:]
    with pytest.raises(DatasetFormatError, match="holds 6 stories, fewer than the 7"):
        tinystories(tmp_path, n_examples=7)


def test_tinystories_reads_the_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    table = pa.table({"text": STORIES})
    pq.write_table(table, tmp_path / "data" / "validation-00000-of-00001.parquet")
    assert tinystories(tmp_path, n_examples=3) == STORIES[-3:]


def test_tinystories_reads_a_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_dict({"text": STORIES})
    datasets.DatasetDict({"validation": split}).save_to_disk(str(tmp_path / "saved"))
    assert tinystories(tmp_path / "saved", n_examples=4) == STORIES[-4:]


def test_tinystories_without_data_says_where_to_get_it():
    with pytest.raises(DatasetNotFoundError, match=r"huggingface-cli download roneneldan"):
        tinystories_gpt2()


def _tiny_gpt2_folder(folder: Path) -> Path:
    """A GPT-2 (2 layers, width 16) and a byte-level tokenizer over letters, saved as
    ``save_pretrained`` saves them: what the recipe reads from a model folder."""
    folder.mkdir()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", ".", "S", "T"]
    vocab = {t: i for i, t in enumerate(letters)}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = transformers.GPT2TokenizerFast(vocab=vocab, merges=[])
    tokenizer.save_pretrained(folder)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=len(vocab), n_positions=64,
        bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@needs_transformers
def test_tinystories_gpt2_reads_its_model_and_tokenizer_from_a_folder(tmp_path):
    stories = ["The cat sat.", "Some dog ran far away.", "The end."]
    (tmp_path / "TinyStories-valid.txt").write_text("<|endoftext|>".join(stories))
    model_dir = _tiny_gpt2_folder(tmp_path / "gpt2")
    setup = tinystories_gpt2(
        data_dir=tmp_path, model_dir=model_dir, n_examples=2, max_length=12, batch_size=1
    )
    first, second = setup["data"]  # one story per batch, padded to the longest
    assert first["input_ids"].shape == second["input_ids"].shape == (1, 12)  # cut at 12
    assert second["attention_mask"][0].tolist() == [1] * 8 + [0] * 4  # "The end." padded
    assert len(setup["components"]) == 2 * (16 * 3 + 16 * 4)
    _run_one_block(setup, tmp_path)


@needs_transformers
def test_tokenize_pads_on_the_right_with_end_of_text(tmp_path):
    tok = transformers.GPT2TokenizerFast.from_pretrained(_tiny_gpt2_folder(tmp_path / "t"))
    batch = tokenize(["ab", "abc d"], tok, max_length=4)
    eos = tok.eos_token_id
    assert batch["input_ids"][0].tolist()[2:] == [eos, eos]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


@needs_transformers
def test_gpt2_model_missing_says_how_to_save_it(tmp_path):
    (tmp_path / "TinyStories-valid.txt").write_text("<|endoftext|>".join(STORIES))
    with pytest.raises(DatasetNotFoundError, match=r"huggingface-cli download gpt2.*COARPY_GPT2"):
        tinystories_gpt2(data_dir=tmp_path, model_dir=tmp_path / "nowhere", n_examples=2)
