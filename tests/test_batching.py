"""Data into batches: rows of a real datasets.Dataset, (x, y) pairs, padding, shuffling."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from coarpy import Components, collect, outputs
from coarpy._batching import as_batches, collate, is_row, is_shuffled
from coarpy._engine import ExampleSet
from coarpy.errors import DataError

IDS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
LABELS = [1, 0, 2]


def _whole(data, batch_size=None):
    return ExampleSet(data, torch.device("cpu"), batch_size).whole


def _expected_tokens(pad=0):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, pad, pad], [11, 12, 13, pad]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    return ids, mask


@pytest.fixture(params=["plain", "torch"])
def dataset(request):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"input_ids": IDS, "label": LABELS})
    return ds if request.param == "plain" else ds.with_format("torch")


def test_rows_of_a_dataset_are_collated_and_padded_like_a_tokenizer(dataset):
    batch = _whole(dataset)
    ids, mask = _expected_tokens()
    assert torch.equal(batch["input_ids"], ids)
    assert torch.equal(batch["attention_mask"], mask)  # added: input_ids were padded
    assert torch.equal(batch["label"], torch.tensor(LABELS))
    assert [len(b["label"]) for b in as_batches(dataset, 2)] == [2, 1]


def test_a_list_of_rows_and_a_loader_of_row_lists_give_the_same_batch(dataset):
    rows = list(dataset)
    loader = DataLoader(dataset, batch_size=2, collate_fn=list)
    for data in (rows, loader):
        batch = _whole(data)
        assert torch.equal(batch["input_ids"], _expected_tokens()[0])
        assert torch.equal(batch["label"], torch.tensor(LABELS))


def test_language_model_rows_pad_labels_with_minus_100_and_keep_a_given_mask():
    rows = [
        {"input_ids": [3, 4, 5], "attention_mask": [1, 1, 1], "labels": [3, 4, 5]},
        {"input_ids": [6, 7], "attention_mask": [1, 1], "labels": [-100, 7]},
    ]
    batch = collate(rows, pad_token_id=2)
    assert batch["input_ids"].tolist() == [[3, 4, 5], [6, 7, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[3, 4, 5], [-100, 7, -100]]
    assert list(batch) == ["input_ids", "attention_mask", "labels"]


def test_pairs_of_unbatched_tensors_equal_the_tensor_tuple():
    x = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1, 0])
    pairs = list(TensorDataset(x, y))
    assert is_row(pairs[0]) and not is_row((x, y))
    got = _whole(pairs)
    assert torch.equal(got[0], x) and torch.equal(got[1], y)
    assert [b[0].shape[0] for b in as_batches(pairs, 2)] == [2, 2, 1]


def test_collect_over_dataset_rows_equals_collect_over_the_batch(dataset, tmp_path):
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        vocab_size=20, num_labels=3,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(cfg).eval()
    comps = Components.discover(model, kinds=("heads", "neurons"))
    ids, mask = _expected_tokens()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(LABELS)}
    args = {"output": outputs.margin, "n_masks": 3, "alpha": 0.2, "progress": False}
    from_rows = collect(model, comps, dataset, path=tmp_path / "rows", **args)
    from_batch = collect(model, comps, batch, path=tmp_path / "batch", **args)
    torch.testing.assert_close(from_rows.outputs(), from_batch.outputs(), rtol=0, atol=0)


def test_text_columns_mixed_data_and_ragged_features_are_refused_with_the_fix():
    with pytest.raises(DataError, match=r"text in field 'text'.*remove_columns"):
        collate([{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    rows = [{"input_ids": [1, 2], "label": 0}]
    batch = {"input_ids": torch.ones(2, 2, dtype=torch.long), "label": torch.zeros(2)}
    with pytest.raises(DataError, match=r"mixes single examples.*with batches"):
        list(as_batches([batch, *rows]))
    with pytest.raises(DataError, match=r"mixes single examples"):
        list(as_batches([*rows, batch]))
    with pytest.raises(DataError, match=r"Row 1 has fields \['input_ids'\], row 0 has"):
        collate([{"input_ids": [1], "label": 0}, {"input_ids": [2]}])
    with pytest.raises(DataError, match=r"shape of field 'x'.*Only token fields"):
        collate([{"x": [0.0, 1.0], "label": 0}, {"x": [0.0], "label": 1}])


def test_batches_pass_through_unchanged():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 3)}
    pair = (torch.ones(4, 2), torch.zeros(4, dtype=torch.long))
    assert not is_row(batch) and not is_row(pair)
    assert list(as_batches([batch]))[0] is batch
    assert list(as_batches([pair]))[0] is pair


def test_shuffled_loaders_are_told_apart():
    ds = TensorDataset(torch.arange(6.0)[:, None], torch.arange(6))
    assert is_shuffled(DataLoader(ds, batch_size=2, shuffle=True))
    assert not is_shuffled(DataLoader(ds, batch_size=2))
    assert is_shuffled(DataLoader(ds, sampler=SubsetRandomSampler(range(4))))
    assert not is_shuffled([ds[i] for i in range(6)])
    assert not is_shuffled((torch.ones(2, 1), torch.ones(2)))


def test_a_model_under_collect_sees_padded_rows_with_their_mask(tmp_path):
    seen = {}

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(1, 3)

        def forward(self, input_ids, attention_mask):
            seen["mask"] = attention_mask
            return self.fc((input_ids * attention_mask).float().sum(1, keepdim=True))

    rows = [{"input_ids": ids, "label": y} for ids, y in zip(IDS, LABELS, strict=True)]
    model = Recorder().eval()
    comps = Components.discover(model, kinds="linear")
    collect(model, comps, rows, path=tmp_path / "r", n_masks=1, alpha=0.5, progress=False)
    assert torch.equal(seen["mask"], _expected_tokens()[1])


def test_a_batch_with_a_scalar_option_is_still_a_batch():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "output_hidden_states": False}
    assert not is_row(batch)
