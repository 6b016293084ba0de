"""Report figures: plots of attributions, their evaluation, learning curves and edits.

Every ``plot_*`` function returns a :class:`matplotlib.figure.Figure` drawn on the Agg
canvas: nothing goes through ``pyplot``, so no window ever opens and no global figure
list grows. matplotlib is the optional extra ``coarpy[report]`` and is imported only
inside these functions. Plots draw what they are given; none of them fits anything.

Text that comes from the user (component and module names, method names, column
names, titles) is drawn literally: a ``$`` never starts matplotlib mathtext.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from ..attributions import Attributions
from ..errors import MissingExtraError, ReportError
from ..evaluate import Evaluation, pearson
from ..learning_curve import LearningCurve
from ._inputs import check_examples, component_layout, is_row_list

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

_POSITIVE, _NEGATIVE = "#2166ac", "#b2182b"  # blue raises the output when kept, red lowers it


def literal(text: Any) -> str:
    r"""``text`` as matplotlib draws it literally: every ``$`` escaped (no mathtext).

    A component named ``blocks.$i$:3`` would otherwise be parsed as mathtext, and a
    name that is not valid mathtext would make drawing the figure fail.

    Examples
    --------
    >>> print(literal("blocks.$i$:3"))
    blocks.\$i\$:3
    """
    return str(text).replace("$", r"\$")


# -- figures ---------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    """A Figure on an Agg canvas (no pyplot, never a window)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MissingExtraError(
            f"coarpy.report draws with matplotlib, which cannot be imported ({err}). "
            "Install the extra: pip install 'coarpy[report]'."
        ) from err
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _check_pairs(keep: Tensor, true: Tensor, n_components: int, n_examples: int) -> Tensor:
    if not isinstance(keep, Tensor) or not isinstance(true, Tensor):
        raise ReportError(
            f"keep and true must be tensors, got {type(keep).__name__} and "
            f"{type(true).__name__}. Pass store.masks(), store.outputs()."
        )
    if keep.ndim != 2 or keep.shape[1] != n_components:
        raise ReportError(
            f"keep must have shape (n_masks, {n_components}), got {tuple(keep.shape)}. "
            "Pass masks over the components the attributions were fitted on."
        )
    if true.shape != (keep.shape[0], n_examples):
        raise ReportError(
            f"true must have shape ({keep.shape[0]}, {n_examples}) (one row per mask, one "
            f"column per example), got {tuple(true.shape)}."
        )
    if keep.shape[0] < 3:
        raise ReportError(
            f"A correlation over masks needs at least 3 masks, got {keep.shape[0]}. "
            "Collect more held-out masks."
        )
    return true.double().cpu()


def plot_predicted_vs_actual(
    attributions: Attributions,
    keep: Tensor,
    true: Tensor,
    *,
    examples: Sequence[int] = (0,),
    title: str | None = None,
) -> Figure:
    """The paper's scatter: predicted against actual output over held-out masks.

    One panel per example; each point is one mask. The panel title gives Pearson's r
    between the two (as :func:`coarpy.evaluate.pearson` computes it).

    Parameters
    ----------
    attributions : the fitted attributions.
    keep : Tensor, shape (n_masks, n_components)
        Held-out keep-masks, e.g. ``heldout_store.masks()``.
    true : Tensor, shape (n_masks, n_examples)
        The model's outputs under those masks, e.g. ``heldout_store.outputs()``.
    examples : indices of the examples to show.
    title : figure title (default names the number of masks).

    Returns
    -------
    matplotlib.figure.Figure
    """
    examples = check_examples(attributions, examples)
    true = _check_pairs(keep, true, attributions.n_components, attributions.n_examples)
    pred = attributions.predict(keep).double().cpu()  # (n_masks, E)
    cols = min(len(examples), 3)
    rows = math.ceil(len(examples) / cols)
    fig = _figure(max(3.6 * cols + 0.4, 5.4), 3.4 * rows + 0.5)  # room for the title
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    r = pearson(pred[:, examples], true[:, examples])  # (len(examples),)
    for ax, e, r_e in zip(axes, examples, r.tolist(), strict=False):
        x, y = true[:, e].numpy(), pred[:, e].numpy()
        ax.scatter(x, y, s=9, alpha=0.6, color=_POSITIVE, edgecolors="none")
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", label="y = x")
        ax.set_title(f"example {e}: r = {r_e:.2f}" if math.isfinite(r_e) else f"example {e}: r n/a")
        ax.set_xlabel("actual output")
        ax.set_ylabel("predicted output")
    for ax in axes[len(examples) :]:
        ax.set_visible(False)
    fig.suptitle(
        literal(title or f"Predicted vs actual output over {keep.shape[0]} held-out masks")
    )
    return fig


def plot_correlations(evaluation: Evaluation, *, metric: str = "pearson") -> Figure:
    """Distribution of the per-example correlation of every method, one panel per alpha.

    Parameters
    ----------
    evaluation : the result of ``coarpy.evaluate`` or ``evaluate_store``.
    metric : ``"pearson"`` or ``"spearman"``.

    Returns
    -------
    matplotlib.figure.Figure
        Step histograms over [-1, 1]; the legend gives each method's mean and the
        number of examples with a defined correlation.
    """
    if metric not in ("pearson", "spearman"):
        raise ReportError(
            f"metric must be 'pearson' or 'spearman', got {metric!r}. Pick one of the two."
        )
    values = getattr(evaluation, metric)  # (M, A, E)
    n_alpha = len(evaluation.alphas)
    fig = _figure(4.2 * n_alpha + 0.4, 3.6)
    axes = fig.subplots(1, n_alpha, squeeze=False, sharey=True).ravel()
    bins = np.linspace(-1.0, 1.0, 41)
    colors = _method_colors(evaluation.attribution_names)
    for a, (ax, alpha) in enumerate(zip(axes, evaluation.alphas, strict=True)):
        for m, method in enumerate(evaluation.attribution_names):
            r = values[m, a].numpy()
            r = r[~np.isnan(r)]
            name = literal(method)
            label = f"{name} (mean {r.mean():.2f}, n={r.size})" if r.size else f"{name} (n=0)"
            ax.hist(r, bins=bins, histtype="step", lw=1.6, color=colors[method], label=label)
        ax.set_title(f"alpha = {alpha:g}")
        ax.set_xlabel(f"{metric.capitalize()} r per example")
        ax.set_xlim(-1, 1)
        ax.legend(fontsize="small", loc="upper left")
    axes[0].set_ylabel("examples")
    fig.suptitle(
        f"Per-example {metric.capitalize()} correlation over {evaluation.n_masks} held-out masks"
    )
    return fig


def _method_colors(methods: Sequence[str]) -> dict[str, str]:
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def _edit_curve_colors(targets: Sequence[str], references: Sequence[str]) -> dict[str, str]:
    """One colour per method, shared by its target (solid) and reference (dashed) curves.

    A column's method is its name without the words target/reference/ref/acc, so
    ``coar_target_acc`` and ``coar_ref_acc`` share a colour; with one method, targets
    are red and references blue, as on every other editing figure.
    """

    def method(c: str) -> str:
        words = [w for w in re.split(r"[_\W]+", c.lower()) if w]
        return "_".join(w for w in words if w not in {"target", "reference", "ref", "acc"})

    methods = list(dict.fromkeys(method(c) for c in [*targets, *references]))
    if len(methods) == 1:
        reds, blues = ["#b2182b", "#ef8a62", "#67001f"], ["#2166ac", "#67a9cf", "#053061"]
        return {
            **{c: reds[i % 3] for i, c in enumerate(targets)},
            **{c: blues[i % 3] for i, c in enumerate(references)},
        }
    by_method = _method_colors(methods)
    return {c: by_method[method(c)] for c in [*targets, *references]}


# -- learning curve --------------------------------------------------------------------


def plot_learning_curve(curve: LearningCurve) -> Figure:
    """Mean Pearson's and Spearman's correlation against the number of training masks.

    Parameters
    ----------
    curve : a curve computed by :mod:`coarpy.learning_curve` (this draws it, and fits
        nothing).

    Returns
    -------
    matplotlib.figure.Figure
        One line per correlation; a log x axis when the sizes span a factor of 10.
    """
    if not isinstance(curve, LearningCurve):
        raise ReportError(
            f"curve must be a LearningCurve, got {type(curve).__name__}. Compute one with "
            "coarpy.learning_curve.learning_curve or store_learning_curve."
        )
    fig = _figure(5.6, 3.6)
    ax = fig.subplots()
    sizes = list(curve.sizes)
    ax.plot(sizes, curve.mean_pearson.numpy(), marker="o", color=_POSITIVE, label="Pearson")
    ax.plot(
        sizes, curve.mean_spearman.numpy(), marker="s", ls="--", color="#d95f02", label="Spearman"
    )
    if len(sizes) > 1 and sizes[-1] / sizes[0] >= 10:
        from matplotlib.ticker import NullFormatter, NullLocator

        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("training masks")
    ax.set_ylabel("mean correlation over examples")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Held-out correlation ({curve.n_heldout} masks) vs training masks")
    return fig


# -- attribution maps ------------------------------------------------------------------


def _values(attributions: Attributions, examples: Any, absolute: bool) -> tuple[Tensor, str]:
    w = attributions.weights.cpu().double()  # (E, N)
    if absolute:
        w = w.abs()
    bars = "|weight|" if absolute else "weight"
    if examples is None:
        return w.mean(0), f"Mean {bars} over all {attributions.n_examples} examples"
    idx = check_examples(attributions, examples)
    if isinstance(examples, (int, np.integer)):
        return w[idx[0]], f"{bars.capitalize()} of example {idx[0]}"
    return w[idx].mean(0), f"Mean {bars} over {len(idx)} examples"


def plot_attribution_map(
    attributions: Attributions,
    *,
    examples: int | Sequence[int] | None = None,
    groups: Any = None,
    absolute: bool = False,
    title: str | None = None,
) -> Figure:
    """Components laid out by layer: one heatmap row per module, one column per unit.

    Groups of one kind share a panel (conv channels, attention heads, MLP neurons),
    so a transformer's heads form a (layer x head) grid. Rows shorter than the panel's
    widest are padded with grey.

    Parameters
    ----------
    attributions : the fitted attributions.
    examples : one example index (its weights), several (their mean weight), or None
        (the mean over all examples).
    groups : a ``Components``, its ``groups``, or ``store.meta["components"]``
        (``[module, kind, n_units]`` lists). Default: modules read from the component
        names (``"module:unit"``), all in one panel.
    absolute : average ``|weight|`` instead of the signed weight (a mean of signed
        weights over many examples can cancel out).
    title : figure title.

    Returns
    -------
    matplotlib.figure.Figure
        One image per kind, sharing one colour scale: symmetric around 0 for signed
        weights, blue positive (keeping the component raises the output) and red
        negative, as in :func:`plot_top_components`.
    """
    layout = component_layout(attributions.names, groups)
    values, default_title = _values(attributions, examples, absolute)  # (N,)
    kinds: dict[str, list[tuple[str, str, int, int]]] = {}
    for g in layout:
        kinds.setdefault(g[1], []).append(g)
    height = sum(0.6 + 0.22 * len(gs) for gs in kinds.values()) + 0.6
    fig = _figure(8.0, max(2.6, height))
    import matplotlib  # importable: _figure checked it

    axes = fig.subplots(
        len(kinds), 1, squeeze=False, height_ratios=[1 + 0.3 * len(g) for g in kinds.values()]
    ).ravel()
    vmax = float(values.abs().max()) or 1.0
    if absolute:
        cmap, vmin = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd"), 0.0
    else:
        cmap, vmin = matplotlib.colormaps["RdBu"].with_extremes(bad="#dddddd"), -vmax
    for ax, (kind, gs) in zip(axes, kinds.items(), strict=True):
        width = max(n for _, _, n, _ in gs)
        grid = np.full((len(gs), width), np.nan)  # (modules, units); NaN pads short rows
        for row, (_, _, n, off) in enumerate(gs):
            grid[row, :n] = values[off : off + n].numpy()
        smooth = "nearest" if width <= 256 else "antialiased"  # wide rows: no aliasing
        image = ax.imshow(
            np.ma.masked_invalid(grid), aspect="auto", interpolation=smooth,
            cmap=cmap, vmin=vmin, vmax=vmax,
        )  # fmt: skip
        step = max(1, math.ceil(len(gs) / 24))
        ticks = range(0, len(gs), step)
        ax.set_yticks(ticks, [literal(gs[i][0]) or "(root)" for i in ticks])
        ax.tick_params(axis="y", labelsize="small")
        ax.set_xlabel(f"unit ({literal(kind)})" if kind else "unit")
    # One colour scale for every panel, so colours compare across kinds.
    fig.colorbar(image, ax=list(axes), label="|weight|" if absolute else "weight", shrink=0.9)
    fig.suptitle(literal(title or default_title))
    return fig


def plot_top_components(
    attributions: Attributions, example: int, *, k: int = 15, title: str | None = None
) -> Figure:
    """The ``k`` components with the largest ``|weight|`` for one example, with signs.

    Bars are sorted by ``|weight|`` (largest on top) and coloured by sign: blue keeps
    the output up (ablating the component lowers it), red the opposite.
    """
    (example,) = check_examples(attributions, [example])
    if k < 1:
        raise ReportError(f"k must be >= 1, got {k}. Pass e.g. k=15.")
    top = attributions.top(example, k=k)
    names = [literal(n) for n, _ in top][::-1]
    weights = [w for _, w in top][::-1]
    fig = _figure(5.4, 0.9 + 0.26 * len(top))
    ax = fig.subplots()
    ax.barh(names, weights, color=[_POSITIVE if w >= 0 else _NEGATIVE for w in weights])
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.tick_params(axis="y", labelsize="small")
    ax.set_xlabel("weight: change in output when the component is kept")
    ax.set_title(literal(title or f"Top {len(top)} components of example {example}"))
    return fig


# -- editing curves --------------------------------------------------------------------


def _columns(rows: Any) -> dict[str, list]:
    """A table as {column: values}, from a list of dicts or a mapping of columns."""
    if isinstance(rows, Mapping):
        cols = {str(c): list(v) for c, v in rows.items()}
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise ReportError(
                f"The table's columns have different lengths {sorted(lengths)}; give every "
                "column one value per row."
            )
        return cols
    if is_row_list(rows):
        keys: list = []
        for r in rows:
            keys += [c for c in r if c not in keys]
        return {str(c): [r.get(c) for r in rows] for c in keys}
    raise ReportError(
        "rows must be a non-empty list of dicts (one per k) or a mapping of column names "
        f"to lists, got {type(rows).__name__}."
    )


def _pick(cols: dict[str, list], given: str | Sequence[str] | None, word: str, k: str):
    if given is None:
        return [c for c in cols if word in c.lower() and c != k and _numeric(cols[c])]
    chosen = [given] if isinstance(given, str) else list(given)
    for c in chosen:
        if c not in cols:
            raise ReportError(
                f"No column {c!r} in the table; it has {list(cols)}. Name existing columns."
            )
    return chosen


def _numeric(values: list) -> bool:
    return all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        for v in values
    )


def plot_edit_curve(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    *,
    k: str = "k",
    target: str | Sequence[str] | None = None,
    reference: str | Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Target and reference metrics against the number of components edited.

    Parameters
    ----------
    rows : a list of dicts (one per value of ``k``) or a mapping of column names to
        lists, e.g. ``[{"k": 0, "target_acc": 0.4, "reference_acc": 0.9}, ...]``.
    k : the column on the x axis.
    target, reference : the columns to draw as target (solid) and reference (dashed)
        metrics. Default: the numeric columns whose name contains ``"target"``, and
        those containing ``"ref"``.
    title : figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    cols = _columns(rows)
    if k not in cols:
        raise ReportError(f"No column {k!r} for the x axis; the table has {list(cols)}. Pass k=.")
    targets = _pick(cols, target, "target", k)
    references = _pick(cols, reference, "ref", k)
    if not targets and not references:
        raise ReportError(
            f"No numeric metric columns to plot among {list(cols)}: name them with target= "
            "and reference=, or use column names containing 'target' or 'ref'."
        )
    for c in [k, *targets, *references]:
        if not _numeric(cols[c]):
            raise ReportError(f"Column {c!r} must hold numbers only, got {cols[c][:5]!r}.")
    order = np.argsort(np.asarray(cols[k], dtype=float), kind="stable")
    x = np.asarray(cols[k], dtype=float)[order]
    fig = _figure(5.6, 3.8)
    ax = fig.subplots()
    colors = _edit_curve_colors(targets, references)
    for c in targets:
        y = np.asarray(cols[c], dtype=float)[order]
        ax.plot(x, y, marker="o", color=colors[c], label=literal(c))
    for c in references:
        y = np.asarray(cols[c], dtype=float)[order]
        ax.plot(x, y, marker="s", ls="--", color=colors[c], label=literal(c))
    ax.set_xlabel(f"{literal(k)} (components edited)")
    ax.set_ylabel("metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(literal(title or "Editing: target and reference metrics"))
    return fig
