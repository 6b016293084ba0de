"""Evaluation: how well attributions predict the model under fresh ablations.

For held-out keep-masks v_1 ... v_n at an ablation fraction alpha, the true outputs
f_z(v_i) of the ablated model are compared with the predictions g_z(v_i) = b_z +
w_z . v_i of each Attributions evaluated. Per example z, Pearson's and Spearman's
correlation over the n masks measure the fit; the paper reports their mean over
examples.

Held-out masks never coincide in distribution with training masks: collection draws
stream 0 of its seed, evaluation at alpha draws stream ``heldout_stream(alpha)``
(1 + round(alpha * 10**6)), so different alphas get different masks too.

Each Attributions evaluated has a name: ``evaluate(attr, ...)`` calls a lone one
``"coar"``; ``evaluate({"coar": attr, "loo": loo, "grad": grad}, ...)`` compares
several on the same masks, in the mapping's order (``method`` is kept for how
attributions were made, ``attr.meta["method"]``). ``evaluate`` runs the model;
``evaluate_store`` reads held-out masks already collected into a ComponentDataset.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import _checks, _fingerprint
from . import outputs as _outputs
from ._engine import (
    ExampleSet,
    autocast_context,
    eval_mode,
    model_device,
    progress_bar,
    run_masks,
)
from .ablation import MODES, Ablator
from .attributions import Attributions
from .components import Components
from .correlation import average_ranks as average_ranks
from .correlation import pearson, spearman, undefined
from .errors import ArgumentError, ComponentError, EvaluationError
from .evaluation import DEFAULT_NAME, Evaluation
from .evaluation import Correlations as Correlations
from .masks import SAMPLERS, sample_masks
from .store import ComponentDataset

_CHUNK = 64  # masks per progress step (rounded up to a multiple of the packing)


# -- held-out masks --------------------------------------------------------------------


def heldout_stream(alpha: float) -> int:
    """The mask stream evaluation draws at ``alpha``: ``1 + round(alpha * 10**6)``.

    Stream 0 is collection's, so held-out masks are never the training masks, and
    each alpha has its own stream.

    Examples
    --------
    >>> heldout_stream(0.05), heldout_stream(0.1)
    (50001, 100001)
    """
    return 1 + round(alpha * 1_000_000)


def heldout_masks(
    n_masks: int, n_components: int, *, alpha: float, seed: int = 1, sampler: str = "bernoulli"
) -> Tensor:
    """The held-out masks ``evaluate`` uses at ``alpha``: bool (n_masks, n_components).

    Use them to collect a held-out store that ``evaluate_store`` reads, e.g. for a
    run on many devices.

    Examples
    --------
    >>> m = heldout_masks(3, 10, alpha=0.2)
    >>> m.shape, m.dtype
    (torch.Size([3, 10]), torch.bool)
    """
    return sample_masks(
        0, n_masks, n_components, alpha=alpha, seed=seed, sampler=sampler,
        stream=heldout_stream(alpha),
    )  # fmt: skip


# -- checks ------------------------------------------------------------------------------


def _named(attributions: Attributions | Mapping[str, Attributions]) -> dict[str, Attributions]:
    if isinstance(attributions, Attributions):
        return {DEFAULT_NAME: attributions}
    if not isinstance(attributions, Mapping):
        raise EvaluationError(
            "attributions must be an Attributions or a mapping of names to Attributions "
            f"(e.g. {{'coar': attr, 'loo': loo}}), got {type(attributions).__name__}."
        )
    if not attributions:
        raise EvaluationError("attributions is an empty mapping; give one, e.g. {'coar': attr}.")
    for name, attr in attributions.items():
        if not isinstance(name, str) or not name:
            raise EvaluationError(
                f"The names of the attributions must be non-empty strings, got {name!r}. "
                "Name each, e.g. {'coar': attr, 'loo': loo}."
            )
        if not isinstance(attr, Attributions):
            raise EvaluationError(
                f"attributions[{name!r}] is a {type(attr).__name__}, not an Attributions. "
                "Fit one with coarpy.fit or a coarpy.baselines function."
            )
    return dict(attributions)


def _check_names(named: dict[str, Attributions], names: Sequence[str], what: str) -> None:
    names = list(names)
    for name, attr in named.items():
        theirs = list(attr.names)
        if theirs == names:
            continue
        if len(theirs) != len(names):
            detail = f"{len(theirs)} components, {what} has {len(names)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(theirs, names, strict=True)) if a != b)
            detail = f"component {i} is {theirs[i]!r} there and {names[i]!r} in {what}"
        raise ComponentError(
            f"Attributions {name!r} were fitted for other components than {what}: "
            f"{detail}. Evaluate with the Components (and model) the attributions were fitted on."
        )


def _check_examples(named: dict[str, Attributions], n_examples: int, what: str) -> None:
    for name, attr in named.items():
        if attr.weights.shape[0] != n_examples:
            raise EvaluationError(
                f"Attributions {name!r} cover {attr.weights.shape[0]} examples, but {what} "
                f"has {n_examples}. Evaluate on the example set the attributions were fitted on."
            )


def _check_alphas(alphas: Iterable[float]) -> tuple[float, ...]:
    if isinstance(alphas, (int, float)) or not isinstance(alphas, Iterable):
        raise EvaluationError(
            f"alphas must be a sequence of ablation fractions, e.g. alphas=(0.05,), got {alphas!r}."
        )
    alphas = tuple(float(a) for a in alphas)
    if not alphas:
        raise EvaluationError("alphas is empty; give at least one, e.g. alphas=(0.05,).")
    for a in alphas:
        if not 0.0 < a < 1.0:
            raise EvaluationError(
                f"Each alpha is the fraction of components ablated and must lie strictly "
                f"between 0 and 1 (at 0 or 1 every mask is the same), got {a}."
            )
    if len(set(alphas)) != len(alphas):
        raise EvaluationError(f"alphas has duplicates: {list(alphas)}. Give each alpha once.")
    return alphas


def _check_n_masks(n_masks: int) -> int:
    if isinstance(n_masks, bool) or not isinstance(n_masks, int) or n_masks < 3:
        raise EvaluationError(
            f"n_masks must be an integer >= 3 (a correlation over fewer masks is "
            f"meaningless), got {n_masks!r}. The paper's evaluations use 100 or more."
        )
    return n_masks


def _warn_if_training_masks(named: dict[str, Attributions], ds: ComponentDataset) -> None:
    # fit records the training store's meta under meta["source"]; a store with the same
    # seed, sampler and alpha holds the same mask rows (both draw stream 0).
    for name, attr in named.items():
        source = attr.meta.get("source")
        if isinstance(source, dict) and all(
            source.get(key) == ds.meta.get(key) for key in ("seed", "sampler", "alpha")
        ):
            warnings.warn(
                f"The store {ds.path} was collected with the seed, sampler and alpha of the "
                f"store attributions {name!r} were fitted on, so its rows are the same masks "
                "the attributions were fitted on: the correlations measure the fit, not "
                "held-out prediction. Collect the held-out store with another seed.",
                stacklevel=3,
            )


def _correlate(
    named: dict[str, Attributions], keep: Tensor, true: Tensor
) -> tuple[Tensor, Tensor, int]:
    """(pearson (A, E), spearman (A, E), n_constant) for masks keep (n, N) and true (n, E),
    over the A attributions; n_constant counts constant (or non-finite) true outputs."""
    true = true.double().cpu()
    pearsons, spearmans = [], []
    for attr in named.values():
        pred = attr.predict(keep).double().cpu()  # (n, E)
        pearsons.append(pearson(pred, true))
        spearmans.append(spearman(pred, true))
    constant = int(undefined(true).sum())
    return torch.stack(pearsons), torch.stack(spearmans), constant


def _build(
    named: dict[str, Attributions],
    alphas: tuple[float, ...],
    n_masks: int,
    per_alpha: list[tuple[Tensor, Tensor, int]],
    meta: dict,
    example_ids: list[str | int] | None = None,
) -> Evaluation:
    return Evaluation(
        attribution_names=tuple(named),
        alphas=alphas,
        n_masks=n_masks,
        pearson=torch.stack([p for p, _, _ in per_alpha], dim=1),  # (attributions, alphas, E)
        spearman=torch.stack([s for _, s, _ in per_alpha], dim=1),
        n_constant=tuple(c for _, _, c in per_alpha),
        meta=meta,
        example_ids=example_ids,
    )


def _example_ids(
    named: dict[str, Attributions], given: list | None, what: str, *, check: bool
) -> list[str | int] | None:
    """The examples' ids: those of the data (or store), else those the attributions
    carry. With ``check``, ids that disagree are refused: the examples differ in order
    or identity."""
    ids = given
    for name, attr in named.items():
        if attr.example_ids is None:
            continue
        if ids is None:
            ids = attr.example_ids
        elif check and attr.example_ids != ids:
            pairs = zip(attr.example_ids, ids, strict=True)
            first = next(i for i, (a, b) in enumerate(pairs) if a != b)
            raise EvaluationError(
                f"attributions[{name!r}] name example {first} {attr.example_ids[first]!r}, "
                f"but {what} names it {ids[first]!r}: the examples differ or are in another "
                "order. Evaluate on the examples the attributions were fitted on, in the same "
                "order (or pass check=False)."
            )
    return ids


# -- public entry points -----------------------------------------------------------------


def evaluate(
    attributions: Attributions | Mapping[str, Attributions],
    model: nn.Module,
    components: Components,
    data: Iterable,
    *,
    output: _outputs.OutputFn | str = _outputs.margin,
    alphas: Sequence[float] = (0.05,),
    n_masks: int = 100,
    seed: int = 1,
    sampler: str = "bernoulli",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    mode: str = "zero",
    means: dict[str, Tensor] | None = None,
    autocast: str | None = None,
    progress: bool | None = None,
    check: bool = True,
    device_budget: int | None = None,
) -> Evaluation:
    """Correlate predicted and true outputs on fresh masks, per example and alpha.

    For each alpha, ``n_masks`` held-out masks (:func:`heldout_masks`) are run through
    the model over ``data`` as ``collect`` runs them, and the predictions
    ``attr.predict(masks)`` of every Attributions given are correlated with the true
    outputs, per example, over the masks. All see the same masks.

    Parameters
    ----------
    attributions : an Attributions (named ``"coar"``), or a mapping of names to
        Attributions, e.g. ``{"coar": attr, "loo": loo, "grad": grad}``.
    model, components, data : the model, the components the attributions are over,
        and the same example set they were fitted on (same examples, same order).
    output : the output function the attributions predict.
    alphas : ablation fractions to evaluate at, each in (0, 1).
    n_masks : held-out masks per alpha (at least 3).
    seed, sampler : the held-out mask sequence; masks come from stream
        ``heldout_stream(alpha)``, never collection's stream 0.
    batch_size, device, mode, means, autocast, progress : as for ``collect``. A
        batch_size larger than the example set runs several masks per forward pass.
    check : compare the model and settings with what each Attributions records (its
        ``meta``, or the store it was fitted on): the weights, the model's structure,
        the output function and its code, mode, means, autocast and the examples.
        ``check=False`` evaluates anyway.
    device_budget : bytes the examples may take on the device, as for ``collect``;
        larger example sets are moved a segment at a time, with the same results.

    Returns
    -------
    Evaluation

    Raises
    ------
    ComponentError : the attributions were fitted for other components.
    EvaluationError : bad alphas or n_masks, another number of examples, or (with
        ``check``) attributions recorded under another model or other settings.
    ArgumentError : a bad seed, sampler, batch_size, device, mode or autocast.

    Examples
    --------
    A model that is exactly additive in its components is predicted perfectly:

    >>> _ = torch.manual_seed(0)
    >>> net = nn.Linear(4, 1).eval()
    >>> comps = Components.from_spec(net, {"": "inputs"})  # the 4 input features
    >>> x = torch.randn(5, 4)
    >>> first = lambda model, batch: model(batch)[:, 0]
    >>> attr = Attributions(weights=(net.weight * x).detach(), bias=net.bias.detach().expand(5),
    ...                     names=comps.names, meta={})
    >>> res = evaluate(attr, net, comps, x, output=first, alphas=(0.25,), n_masks=20)
    >>> res.per_example("coar").pearson.round(decimals=6)
    tensor([1., 1., 1., 1., 1.], dtype=torch.float64)
    """
    named = _named(attributions)
    alphas = _check_alphas(alphas)
    n_masks = _check_n_masks(n_masks)
    if sampler not in SAMPLERS:
        raise EvaluationError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
    model = _checks.module(model)
    _checks.seed(seed)
    _checks.device(device)
    _checks.device_budget(device_budget)
    _checks.choice(mode, "mode", MODES)
    _checks.flag(check, "check")
    _checks.optional_flag(progress, "progress")
    if not isinstance(components, Components):
        raise ArgumentError(
            f"components must be a coarpy.Components, got {type(components).__name__}."
        )
    _check_names(named, components.names, "these components")
    output_fn = _outputs.resolve(output)
    if device is not None:
        model.to(device)
    device = model_device(model)
    cast = autocast_context(device, autocast)
    examples = ExampleSet(data, device, batch_size, device_budget=device_budget)
    examples.check_labels(output_fn)
    _check_examples(named, examples.n_examples, "data")
    actual = _fingerprint.record(
        model, output_fn, mode=mode, means=means, autocast=autocast,
        data_fingerprint=examples.fingerprint(),
    )  # fmt: skip
    _checks.check_attributions(named, actual, check=check, error=EvaluationError, use="evaluate")
    ids = _example_ids(named, examples.ids, "the data", check=check)

    step = examples.pack * -(-_CHUNK // examples.pack)
    per_alpha = []
    ablator = Ablator(model, components, mode=mode, means=means)
    bar = progress_bar(len(alphas) * -(-n_masks // step), progress, desc="evaluate")
    try:
        with eval_mode(model, "evaluate"), ablator, torch.inference_mode(), cast:
            for alpha in alphas:
                keep = heldout_masks(
                    n_masks, len(components), alpha=alpha, seed=seed, sampler=sampler
                )  # (n_masks, N) bool
                true = torch.empty(n_masks, examples.n_examples)  # (n_masks, E)
                for start in range(0, n_masks, step):
                    rows = keep[start : start + step].to(device)
                    true[start : start + step] = run_masks(
                        model, ablator, examples, rows, output_fn
                    ).cpu()
                    bar.update(1)
                per_alpha.append(_correlate(named, keep, true))
    finally:
        bar.close()
    meta = {
        "source": "model",
        "seed": seed,
        "sampler": sampler,
        "streams": [heldout_stream(a) for a in alphas],
        "output": _outputs.name_of(output_fn),
        "mode": mode,
        "autocast": autocast,
    }
    return _build(named, alphas, n_masks, per_alpha, meta, ids)


def evaluate_store(
    attributions: Attributions | Mapping[str, Attributions],
    ds: ComponentDataset,
    *,
    check: bool = True,
) -> Evaluation:
    """Correlate predicted and true outputs on masks already collected into ``ds``.

    ``ds`` is a held-out component dataset (its finished rows are used): collect it
    with another seed than the training store, or fill it with :func:`heldout_masks`.
    The evaluation has the store's single alpha.

    Parameters
    ----------
    attributions : an Attributions (named ``"coar"``), or a mapping of names to them.
    ds : the held-out store, over the same components and examples.
    check : compare the store's model and settings with what each Attributions
        records, as ``evaluate`` does; ``check=False`` evaluates anyway.

    Raises
    ------
    ComponentError : the store's components differ from the attributions'.
    EvaluationError : fewer than 3 finished rows, another number of examples, or
        (with ``check``) a store collected under another model or other settings.
    """
    named = _named(attributions)
    if not isinstance(ds, ComponentDataset):
        raise ArgumentError(
            f"ds must be a ComponentDataset (the held-out store), got {type(ds).__name__}. "
            "Open one with coarpy.ComponentDataset(path)."
        )
    _checks.flag(check, "check")
    _check_names(named, ds.names, f"the store {ds.path}")
    _check_examples(named, ds.n_examples, f"the store {ds.path}")
    actual = {k: ds.meta[k] for k in _checks.RECORDED if k in ds.meta}
    _checks.check_attributions(
        named, actual, check=check, error=EvaluationError, use="evaluate_store"
    )
    ids = _example_ids(named, ds.example_ids, f"the store {ds.path}", check=check)
    n_done = len(ds)
    if n_done < 3:
        raise EvaluationError(
            f"The store {ds.path} has {n_done} finished mask rows; a correlation needs at "
            "least 3. Run collect on it until more blocks are done."
        )
    alpha = float(ds.alpha)
    if not 0.0 < alpha < 1.0:
        raise EvaluationError(
            f"The store {ds.path} was collected at alpha={alpha}: every mask is the same, "
            "so no correlation is defined. Collect the held-out store at 0 < alpha < 1."
        )
    _warn_if_training_masks(named, ds)
    keep = ds.masks()  # (n_done, N) bool
    true = ds.outputs()  # (n_done, E) float32
    meta = {
        "source": str(ds.path),
        "seed": ds.seed,
        "sampler": ds.meta["sampler"],
        "output": ds.meta["output"],
        "mode": ds.meta["mode"],
    }
    return _build(named, (alpha,), n_done, [_correlate(named, keep, true)], meta, ids)
