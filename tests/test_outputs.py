"""Output functions on hand-set logits, checked against hand computations."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from coarpy import outputs
from coarpy.errors import ArgumentError, DataError
from coarpy.outputs import REGISTRY, OutputFn, check_values, name_of, resolve


class FixedLogits(nn.Module):
    """Returns the same logits whatever the input (classifier or language model)."""

    def __init__(self, logits: torch.Tensor, wrap: bool = False):
        super().__init__()
        self.register_buffer("logits", logits)
        self.wrap = wrap
        self.calls: list[tuple[tuple, dict]] = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return SimpleNamespace(logits=self.logits) if self.wrap else self.logits


LOGITS = torch.tensor([[2.0, 5.0, 1.0], [3.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
LABELS = torch.tensor([1, 0, 2])


def log_sum_exp(row: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in row))


def test_margin_on_hand_set_logits():
    got = outputs.margin(FixedLogits(LOGITS), (torch.zeros(3, 1), LABELS))
    assert got.tolist() == [3.0, 2.5, 0.0]


def test_logit_logprob_and_loss_on_hand_set_logits():
    model = FixedLogits(LOGITS)
    batch = (torch.zeros(3, 1), LABELS)
    rows = LOGITS.tolist()
    want_logprob = [rows[i][y] - log_sum_exp(rows[i]) for i, y in enumerate(LABELS.tolist())]
    assert outputs.logit(model, batch).tolist() == [5.0, 3.0, 0.0]
    torch.testing.assert_close(
        outputs.logprob(model, batch), torch.tensor(want_logprob), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(
        outputs.loss(model, batch), -torch.tensor(want_logprob), rtol=1e-6, atol=1e-6
    )
    assert want_logprob[2] == pytest.approx(-math.log(3))


def test_dict_batches_pass_inputs_as_keywords_without_labels():
    model = FixedLogits(LOGITS, wrap=True)  # .logits, as transformers models return
    got = outputs.margin(model, {"pixel_values": torch.zeros(3, 1), "labels": LABELS})
    assert got.tolist() == [3.0, 2.5, 0.0]
    ((args, kwargs),) = model.calls
    assert args == () and list(kwargs) == ["pixel_values"]


def test_margin_is_float32_for_half_logits():
    got = outputs.margin(FixedLogits(LOGITS.half()), (torch.zeros(3, 1), LABELS))
    assert got.dtype == torch.float32 and got.tolist() == [3.0, 2.5, 0.0]


def test_classifier_outputs_need_labels():
    model = FixedLogits(LOGITS)
    with pytest.raises(DataError, match=r"needs labels, but the batch \(Tensor\) has none"):
        outputs.margin(model, torch.zeros(3, 1))
    with pytest.raises(DataError, match=r"needs labels, but the batch \(dict\) has none"):
        outputs.loss(model, {"input_ids": torch.zeros(3, 1)})


def test_classifier_outputs_refuse_sequence_logits():
    model = FixedLogits(torch.zeros(3, 4, 5))
    with pytest.raises(ArgumentError, match=r"\(batch, classes\), got \(3, 4, 5\).*token_margin"):
        outputs.margin(model, (torch.zeros(3, 1), LABELS))


# -- language-model outputs -------------------------------------------------------


def hand_token_values(logits, targets, attention_mask):
    """Per example: list of (margin, logprob) of each real next-token prediction.

    A prediction at position t of token t+1 counts iff the target is not -100 and
    both t and t+1 are real tokens (a padding position predicts nothing)."""
    result = []
    for b, row in enumerate(logits.tolist()):
        values = []
        for t in range(len(row) - 1):
            target = int(targets[b][t + 1])
            real = attention_mask is None or (attention_mask[b][t] and attention_mask[b][t + 1])
            if target == -100 or not real:
                continue
            scores = row[t]
            others = [v for k, v in enumerate(scores) if k != target]
            values.append((scores[target] - max(others), scores[target] - log_sum_exp(scores)))
        result.append(values)
    return result


def lm_case(padding_side: str):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen) * 3
    ids = torch.tensor([[1, 4, 2, 6, 3], [5, 2, 0, 0, 0], [3, 3, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    if padding_side == "left":
        ids = torch.stack([row.roll(int((m == 0).sum())) for row, m in zip(ids, mask, strict=True)])
        mask = torch.stack([m.roll(int((m == 0).sum())) for m in mask])
    return logits, ids, mask


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_token_margin_and_logprob_skip_padding(padding_side):
    logits, ids, mask = lm_case(padding_side)
    batch = {"input_ids": ids, "attention_mask": mask}
    model = FixedLogits(logits, wrap=True)
    expected = hand_token_values(logits, ids.tolist(), mask.tolist())
    assert [len(v) for v in expected] == [4, 1, 2]
    want_margin = torch.tensor([sum(m for m, _ in v) / len(v) for v in expected])
    want_logprob = torch.tensor([sum(lp for _, lp in v) for v in expected])
    torch.testing.assert_close(outputs.token_margin(model, batch), want_margin)
    torch.testing.assert_close(outputs.token_logprob(model, batch), want_logprob)


def test_token_margin_skips_minus_100_labels():
    logits, ids, mask = lm_case("right")
    labels = ids.clone()
    labels[0, [1, 3]] = -100
    labels[2, 1] = -100
    labels[mask == 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    expected = hand_token_values(logits, labels.tolist(), mask.tolist())
    assert [len(v) for v in expected] == [2, 1, 1]
    want = torch.tensor([sum(m for m, _ in v) / len(v) for v in expected])
    model = FixedLogits(logits)
    torch.testing.assert_close(outputs.token_margin(model, batch), want)
    # without an attention mask, -100 labels alone decide what counts
    no_mask = {"input_ids": ids, "labels": labels}
    torch.testing.assert_close(outputs.token_margin(model, no_mask), want)
    assert "labels" not in model.calls[-1][1]


def test_token_outputs_ignore_non_finite_logits_at_padding():
    logits, ids, mask = lm_case("right")
    clean = outputs.token_margin(FixedLogits(logits), {"input_ids": ids, "attention_mask": mask})
    dirty_logits = logits.clone()
    dirty_logits[1, 2:] = float("nan")  # what some models give at padded positions
    dirty = {"input_ids": ids, "attention_mask": mask}
    assert torch.equal(outputs.token_margin(FixedLogits(dirty_logits), dirty), clean)
    assert torch.isfinite(outputs.token_logprob(FixedLogits(dirty_logits), dirty)).all()


def test_token_outputs_need_a_dict_batch():
    with pytest.raises(DataError, match=r"expect a dict batch with 'input_ids', got tuple"):
        outputs.token_margin(FixedLogits(torch.zeros(1, 3, 4)), (torch.zeros(1, 3),))


def test_an_example_without_real_targets_is_named():
    logits, ids, mask = lm_case("right")
    mask[1, 1] = 0  # example 1 is now one real token: nothing to predict
    with pytest.raises(DataError, match=r"Example 1 of the batch has no real next-token"):
        outputs.token_margin(FixedLogits(logits), {"input_ids": ids, "attention_mask": mask})


# -- registry, names, contract ----------------------------------------------------


def test_every_registered_output_has_the_contract_signature():
    contract = list(inspect.signature(OutputFn.__call__).parameters)[1:]  # drop self
    for name, fn in REGISTRY.items():
        assert list(inspect.signature(fn).parameters) == contract, name
        assert name_of(fn) == name
        assert resolve(name) is fn


def test_resolve_imports_module_colon_function():
    assert resolve("coarpy.outputs:logit") is outputs.logit


def my_output(model, batch):
    return torch.zeros(1)


def test_name_of_a_custom_function_is_module_and_qualname():
    assert name_of(my_output) == f"{my_output.__module__}:my_output"
    assert resolve(my_output) is my_output


def test_resolve_refuses_unknown_names():
    with pytest.raises(ArgumentError, match=r"Unknown output function 'marginal'.*margin, logit"):
        resolve("marginal")
    with pytest.raises(ValueError, match=r"Cannot import module 'no_such_pkg.mod'"):
        resolve("no_such_pkg.mod:fn")
    with pytest.raises(ValueError, match=r"has no attribute 'nope'"):
        resolve("coarpy.outputs:nope")


def test_check_values_wants_one_number_per_example():
    with pytest.raises(ArgumentError, match=r"my_output returned \(2, 3\), expected shape \(2,\)"):
        check_values(torch.zeros(2, 3), 2, my_output)
    with pytest.raises(ArgumentError, match=r"returned list"):
        check_values([0.0, 1.0], 2, my_output)
    assert check_values(torch.ones(2, dtype=torch.float64), 2, my_output).dtype == torch.float32
