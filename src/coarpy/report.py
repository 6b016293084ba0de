"""Reports: plots of attributions and their evaluation, and one self-contained HTML page.

Every ``plot_*`` function returns a :class:`matplotlib.figure.Figure` drawn on the Agg
canvas: nothing goes through ``pyplot``, so no window ever opens and no global figure
list grows. matplotlib is the optional extra ``coarpy[report]`` and is imported only
inside these functions.

:func:`write_report` puts a run's settings, progress, evaluation, plots, top
components and edits into ``out/report.html``, with every image embedded as a base64
PNG, so the file can be mailed or archived alone. :func:`report_run` loads what a run
directory holds (``coarpy.runs`` layout) and calls it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from . import _fs
from .attributions import Attributions
from .errors import MissingExtraError, ReportError
from .evaluate import Evaluation, pearson, spearman
from .store import ComponentDataset

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

REPORT_NAME = "report.html"
_POSITIVE, _NEGATIVE = "#2166ac", "#b2182b"  # blue raises the output when kept, red lowers it
_AUTO_CURVE_MAX_COMPONENTS = 4096  # refits in a report: one (N x N) eigendecomposition each
_AUTO_CURVE_MAX_CELLS = 2**27  # rows * (components + examples) read into memory
_MAX_TABLE_ROWS = 200


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


def _check_examples(attributions: Attributions, examples: Sequence[int]) -> list[int]:
    if isinstance(examples, (int, np.integer)):
        examples = [int(examples)]
    examples = [int(e) for e in examples]
    if not examples:
        raise ReportError("examples is empty; give at least one example index, e.g. (0,).")
    n = attributions.n_examples
    for e in examples:
        if not 0 <= e < n:
            raise ReportError(
                f"Example {e} is out of range: the attributions cover {n} examples "
                f"(0 ... {n - 1}). Pick example indices in that range."
            )
    return examples


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
    examples = _check_examples(attributions, examples)
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
    fig.suptitle(title or f"Predicted vs actual output over {keep.shape[0]} held-out masks")
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
        raise ReportError(f"metric must be 'pearson' or 'spearman', got {metric!r}.")
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
            label = f"{method} (mean {r.mean():.2f}, n={r.size})" if r.size else f"{method} (n=0)"
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


# -- learning curve --------------------------------------------------------------------


@dataclass(frozen=True)
class LearningCurve:
    """Held-out correlation of attributions fitted on the first ``n`` training rows.

    Attributes
    ----------
    sizes : the numbers of training rows, ascending.
    pearson : (n_sizes, n_examples) float64; NaN where undefined.
    spearman : same shape.
    n_heldout : the number of held-out masks the correlations are over.
    method : the regression method (``coarpy.regression.fit``'s ``method``).
    """

    sizes: tuple[int, ...]
    pearson: Tensor
    spearman: Tensor
    n_heldout: int
    method: str

    @property
    def mean_pearson(self) -> Tensor:
        """Mean over examples of Pearson's r, per size: (n_sizes,) float64."""
        return torch.nanmean(self.pearson, dim=1)

    @property
    def mean_spearman(self) -> Tensor:
        """Mean over examples of Spearman's rho, per size: (n_sizes,) float64."""
        return torch.nanmean(self.spearman, dim=1)

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per size: ``n_masks``, ``pearson_mean``, ``spearman_mean``."""
        return [
            {"n_masks": n, "pearson_mean": float(p), "spearman_mean": float(s)}
            for n, p, s in zip(
                self.sizes, self.mean_pearson.tolist(), self.mean_spearman.tolist(), strict=True
            )
        ]


def _as_arrays(source: Any, what: str) -> tuple[Tensor, Tensor]:
    if isinstance(source, ComponentDataset):
        return source.masks(), source.outputs()
    if isinstance(source, tuple) and len(source) == 2:
        keep, out = source
        if isinstance(keep, Tensor) and isinstance(out, Tensor):
            return keep, out
    raise ReportError(
        f"{what} must be a ComponentDataset or a tuple (masks (n, N), outputs (n, E)) of "
        f"tensors, got {type(source).__name__}."
    )


def _default_sizes(n_rows: int) -> list[int]:
    smallest = min(n_rows, max(30, n_rows // 32))
    return sorted({int(round(v)) for v in np.geomspace(smallest, n_rows, 6)})


def _check_sizes(sizes: Sequence[int] | None, n_rows: int) -> list[int]:
    if sizes is None:
        return _default_sizes(n_rows)
    sizes = sorted({int(n) for n in sizes})
    if not sizes:
        raise ReportError("sizes is empty; give the numbers of training rows, e.g. (100, 1000).")
    if sizes[0] < 2 or sizes[-1] > n_rows:
        raise ReportError(
            f"sizes must lie between 2 and the {n_rows} training rows available, got "
            f"{sizes[0]} ... {sizes[-1]}. Drop the sizes above {n_rows} or collect more masks."
        )
    return sizes


def _learning_curve(
    train: Any,
    keep: Tensor,
    true: Tensor,
    *,
    sizes: Sequence[int] | None,
    method: str,
    seed: int,
) -> tuple[LearningCurve, Attributions]:
    from .regression import fit

    V, Y = _as_arrays(train, "train")  # (n, N) bool, (n, E) float32
    true = _check_pairs(keep, true, V.shape[1], Y.shape[1])
    sizes = _check_sizes(sizes, V.shape[0])
    pearsons, spearmans = [], []
    for n in sizes:
        attr = fit((V[:n], Y[:n]), method=method, seed=seed, progress=False)
        pred = attr.predict(keep).double().cpu()  # (n_heldout, E)
        pearsons.append(pearson(pred, true))
        spearmans.append(spearman(pred, true))
    curve = LearningCurve(
        sizes=tuple(sizes),
        pearson=torch.stack(pearsons),
        spearman=torch.stack(spearmans),
        n_heldout=keep.shape[0],
        method=method,
    )
    return curve, attr  # the fit on the most rows (sizes is never empty)


def learning_curve(
    train: ComponentDataset | tuple[Tensor, Tensor],
    keep: Tensor,
    true: Tensor,
    *,
    sizes: Sequence[int] | None = None,
    method: str = "ridge",
    seed: int = 0,
) -> LearningCurve:
    """Held-out correlation against the number of training masks.

    For each ``n`` in ``sizes``, attributions are fitted with
    :func:`coarpy.regression.fit` on the first ``n`` finished rows of ``train`` and
    correlated, per example, with the true outputs on the held-out masks.

    Parameters
    ----------
    train : the training store, or in-memory ``(masks (n, N), outputs (n, E))``.
    keep : Tensor, shape (n_heldout, N)
        Held-out masks (never among the training rows).
    true : Tensor, shape (n_heldout, E)
        The model's outputs under them.
    sizes : numbers of training rows; default six sizes spaced geometrically up to
        all rows.
    method, seed : passed to ``fit``.

    Returns
    -------
    LearningCurve

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> V = torch.rand(300, 5, generator=g) > 0.2
    >>> Y = V.float() @ torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]]) + 1.0
    >>> curve = learning_curve((V[:250], Y[:250]), V[250:], Y[250:], sizes=(50, 250),
    ...                        method="ols")
    >>> curve.mean_pearson.round(decimals=6).tolist()
    [1.0, 1.0]
    """
    curve, _ = _learning_curve(train, keep, true, sizes=sizes, method=method, seed=seed)
    return curve


def plot_learning_curve(curve: LearningCurve) -> Figure:
    """Mean Pearson's and Spearman's correlation against the number of training masks."""
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


def _layout(names: Sequence[str], groups: Any) -> list[tuple[str, str, int, int]]:
    """(module, kind, n_units, offset) per group, checked against the names."""
    if groups is None:
        out: list[tuple[str, str, int, int]] = []
        for i, name in enumerate(names):
            module = name.rpartition(":")[0] if ":" in name else ""
            if out and out[-1][0] == module:
                m, k, n, off = out[-1]
                out[-1] = (m, k, n + 1, off)
            else:
                out.append((module, "", 1, i))
        return out
    groups = getattr(groups, "groups", groups)  # a Components holds its groups
    out, offset = [], 0
    for g in groups:
        if hasattr(g, "module"):
            module, kind, n_units = g.module, g.kind, g.n_units
        else:
            module, kind, n_units = g[0], g[1], int(g[2])
        out.append((str(module), str(kind), int(n_units), offset))
        offset += int(n_units)
    if offset != len(names):
        raise ReportError(
            f"The groups hold {offset} components but the attributions have {len(names)}. "
            "Pass the Components (or store.meta['components']) the attributions were fitted on."
        )
    return out


def _values(attributions: Attributions, examples: Any, absolute: bool) -> tuple[Tensor, str]:
    w = attributions.weights.cpu().double()  # (E, N)
    if absolute:
        w = w.abs()
    bars = "|weight|" if absolute else "weight"
    if examples is None:
        return w.mean(0), f"Mean {bars} over all {attributions.n_examples} examples"
    idx = _check_examples(attributions, examples)
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
    layout = _layout(attributions.names, groups)
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
        ax.set_yticks(ticks, [gs[i][0] or "(root)" for i in ticks])
        ax.tick_params(axis="y", labelsize="small")
        ax.set_xlabel(f"unit ({kind})" if kind else "unit")
    # One colour scale for every panel, so colours compare across kinds.
    fig.colorbar(image, ax=list(axes), label="|weight|" if absolute else "weight", shrink=0.9)
    fig.suptitle(title or default_title)
    return fig


def plot_top_components(
    attributions: Attributions, example: int, *, k: int = 15, title: str | None = None
) -> Figure:
    """The ``k`` components with the largest ``|weight|`` for one example, with signs.

    Bars are sorted by ``|weight|`` (largest on top) and coloured by sign: blue keeps
    the output up (ablating the component lowers it), red the opposite.
    """
    (example,) = _check_examples(attributions, [example])
    if k < 1:
        raise ReportError(f"k must be >= 1, got {k}.")
    top = attributions.top(example, k=k)
    names = [n for n, _ in top][::-1]
    weights = [w for _, w in top][::-1]
    fig = _figure(5.4, 0.9 + 0.26 * len(top))
    ax = fig.subplots()
    ax.barh(names, weights, color=[_POSITIVE if w >= 0 else _NEGATIVE for w in weights])
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.tick_params(axis="y", labelsize="small")
    ax.set_xlabel("weight: change in output when the component is kept")
    ax.set_title(title or f"Top {len(top)} components of example {example}")
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
    if _is_row_list(rows):
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
    for i, c in enumerate(targets):
        y = np.asarray(cols[c], dtype=float)[order]
        ax.plot(x, y, marker="o", color=["#b2182b", "#ef8a62", "#67001f"][i % 3], label=c)
    for i, c in enumerate(references):
        y = np.asarray(cols[c], dtype=float)[order]
        ax.plot(x, y, marker="s", ls="--", color=["#2166ac", "#67a9cf", "#053061"][i % 3], label=c)
    ax.set_xlabel(f"{k} (components edited)")
    ax.set_ylabel("metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or "Editing: target and reference metrics")
    return fig


# -- HTML ------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Figure, alt: str) -> str:
    return (
        f'<figure><img src="data:image/png;base64,{_png(fig)}" alt="{_esc(alt)}">'
        f"<figcaption>{_esc(alt)}</figcaption></figure>"
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(value)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p>(empty)</p>"
    if columns is None:
        columns = []
        for r in rows:
            columns += [c for c in r if c not in columns]
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc(_cell(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows[:_MAX_TABLE_ROWS]
    )
    more = ""
    if len(rows) > _MAX_TABLE_ROWS:
        more = f"<p>{len(rows) - _MAX_TABLE_ROWS} more rows not shown.</p>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def _key_values(meta: Mapping[str, Any], skip: Sequence[str] = ()) -> list[dict[str, Any]]:
    rows = []
    for key, value in meta.items():
        if key in skip:
            continue
        if isinstance(value, Mapping):
            rows += [
                {"setting": f"{key}.{k}", "value": v}
                for k, v in value.items()
                if not isinstance(v, (Mapping, list))
            ]
        elif isinstance(value, list) and len(value) > 8:
            rows.append({"setting": key, "value": f"list of {len(value)}"})
        else:
            rows.append({"setting": key, "value": value})
    return rows


def _evaluation_row(row: Mapping[str, Any]) -> dict[str, str]:
    def f(key: str) -> str:
        value = row[key]
        return "n/a" if value is None else f"{value:.3f}"

    return {
        "attribution": row["attribution"],
        "alpha": f"{row['alpha']:g}",
        "n": f"{row['n_defined']} of {row['n_examples']}",
        "Pearson mean": f("pearson_mean"),
        "Pearson median": f("pearson_median"),
        "Pearson IQR": f"{f('pearson_q25')} to {f('pearson_q75')}",
        "Spearman mean": f("spearman_mean"),
        "Spearman median": f("spearman_median"),
    }


def _effect(weight: float) -> str:
    if weight > 0:
        return "lowers the output"
    return "raises the output" if weight < 0 else "no change"


def _section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{_esc(anchor)}"><h2>{_esc(heading)}</h2>\n{body}\n</section>'


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
th { background: #f3f3f3; } tbody tr:nth-child(even) { background: #fafafa; }
td { font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; }
figcaption { color: #666; font-size: .85em; }
nav a { margin-right: 1em; } .note { color: #666; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
"""


def _progress_rows(store: ComponentDataset) -> list[dict[str, Any]]:
    from .runs import status

    info = status(store.path)
    rows = [
        {"": "masks", "value": f"{info['done_rows']} / {info['n_masks']} "
                               f"({100 * info['fraction']:.1f}%)"},
        {"": "blocks", "value": f"{info['done_blocks']} / {info['n_blocks']}"},
    ]  # fmt: skip
    if info.get("masks_per_s"):
        rows.append({"": "speed", "value": f"{info['masks_per_s']:.2f} masks/s"})
        if info.get("eta_s"):
            rows.append({"": "ETA", "value": f"{info['eta_s'] / 60:.1f} min"})
    if info.get("last_block_time"):
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["last_block_time"]))
        rows.append({"": "last block written", "value": last})
    return rows


def _curve_inputs(store, heldout, curve_sizes, notes: list[str]):
    """(train, keep, true, label) for the learning curve, or None with a note why not."""
    if store is None:
        return None
    if curve_sizes is None:
        cells = len(store) * (store.n_components + store.n_examples)
        if store.n_components > _AUTO_CURVE_MAX_COMPONENTS or cells > _AUTO_CURVE_MAX_CELLS:
            notes.append(
                f"Learning curve skipped: refitting {store.n_components} components on "
                f"{len(store)} rows is too heavy for a report. Pass curve_sizes= to force it."
            )
            return None
    V, Y = store.masks(), store.outputs()  # (n, N) bool, (n, E) float32
    if heldout is not None:
        keep, true = _as_arrays(heldout, "heldout")
        return (V, Y), keep, true, f"{keep.shape[0]} held-out masks"
    n = V.shape[0]
    n_hold = min(max(n // 5, 10), 1000)
    if n - n_hold < 30:
        notes.append(
            f"Learning curve skipped: the store has {n} finished rows; at least 40 are needed "
            "to fit on some and hold out the rest."
        )
        return None
    label = f"the store's last {n_hold} rows, held out from every refit"
    return (V[: n - n_hold], Y[: n - n_hold]), V[n - n_hold :], Y[n - n_hold :], label


def write_report(
    out: str | os.PathLike,
    *,
    evaluation: Evaluation | None = None,
    attributions: Attributions | None = None,
    store: ComponentDataset | None = None,
    examples: Sequence[int] = (0,),
    edits: Mapping[str, Any] | None = None,
    heldout: ComponentDataset | tuple[Tensor, Tensor] | None = None,
    curve_sizes: Sequence[int] | None = None,
    top_k: int = 15,
    title: str | None = None,
) -> Path:
    """Write ``out/report.html``: one self-contained page summarising a run.

    Sections appear for what is given: settings (store and fit), collection progress,
    the evaluation table and correlation histograms, a learning curve and the
    predicted-vs-actual scatter, attribution maps and top components of ``examples``,
    and edits.

    The scatter uses ``attributions`` on ``heldout`` when it is given. Without it the
    report refits on the first rows of ``store`` and predicts its last rows (held out
    from that refit; the masks are i.i.d.), and says so in the caption.

    Parameters
    ----------
    out : directory to write into (created if missing).
    evaluation, attributions, store : any of a run's results; None leaves a section out.
    examples : example indices whose scatter, attribution map and top components to show.
    edits : ``{name: result}`` where a result is a list of row dicts (drawn with
        :func:`plot_edit_curve` when it has a ``k`` column) or a dict of settings and
        such lists.
    heldout : a held-out store or ``(masks, outputs)`` for the scatter and the curve.
    curve_sizes : training sizes of the learning curve; ``()`` leaves it out. By
        default six sizes, skipped for stores too large to refit cheaply.
    top_k : components listed per example.
    title : page title (default: the store's directory name).

    Returns
    -------
    Path of the written ``report.html``.
    """
    if evaluation is None and attributions is None and store is None and not edits:
        raise ReportError(
            "write_report got nothing to report: pass evaluation=, attributions=, store= or "
            "edits= (or use report_run(RUN) to load a run directory)."
        )
    if attributions is not None:
        examples = _check_examples(attributions, examples)
        if store is not None and list(attributions.names) != store.names:
            raise ReportError(
                f"The attributions are over {attributions.n_components} components that differ "
                f"from the {store.n_components} of the store {store.path}. Pass the store the "
                "attributions were fitted on."
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = title or (store.path.name if store is not None else out.resolve().name)
    notes: list[str] = []
    sections: list[str] = []

    # settings
    body = ""
    if store is not None:
        body += "<h3>Component dataset</h3>" + _table(
            _key_values({"path": str(store.path), **store.meta}, skip=("components",))
        )
        body += "<h3>Components</h3>" + _table(
            [
                {"module": m, "kind": k, "units": n}
                for m, k, n, _ in _layout(store.names, store.meta["components"])
            ]
        )
    if attributions is not None:
        body += "<h3>Attributions</h3>" + _table(
            _key_values(
                {
                    "n_examples": attributions.n_examples,
                    "n_components": attributions.n_components,
                    **attributions.meta,
                },
                skip=("source",),
            )
        )
    if body:
        sections.append(_section("settings", "Settings", body))

    if store is not None:
        sections.append(_section("progress", "Progress", _table(_progress_rows(store))))

    if evaluation is not None:
        body = _table([_evaluation_row(r) for r in evaluation.to_rows()])
        body += (
            f'<p class="note">Correlation over {evaluation.n_masks} held-out masks per example; '
            "n = examples with a defined correlation (of all examples). IQR = quartiles.</p>"
        )
        if evaluation.meta:
            masks = ", ".join(f"{k}={_cell(v)}" for k, v in evaluation.meta.items())
            body += f'<p class="note">Held-out masks: {_esc(masks)}.</p>'

        body += _img(
            plot_correlations(evaluation),
            "Per-example Pearson correlation on held-out masks, per method and alpha",
        )
        sections.append(_section("evaluation", "Evaluation", body))

    # learning curve and scatter
    scatter: tuple[Attributions, Tensor, Tensor, str] | None = None
    if attributions is not None and heldout is not None:
        keep, true = _as_arrays(heldout, "heldout")
        scatter = (attributions, keep, true, f"the attributions on {keep.shape[0]} held-out masks")
    if curve_sizes is None or len(curve_sizes):
        found = _curve_inputs(store, heldout, curve_sizes, notes)
        if found is not None:
            train, keep, true, label = found
            method = attributions.meta.get("method") if attributions is not None else None
            method = method if method in ("ridge", "ols", "lasso") else "ridge"
            curve, last = _learning_curve(
                train, keep, true, sizes=curve_sizes, method=method, seed=0
            )
            body = _img(
                plot_learning_curve(curve),
                f"Mean held-out correlation against training masks ({method} refits; "
                f"correlations over {label})",
            )
            body += _table(
                [
                    {k: f"{v:.3f}" if isinstance(v, float) else v for k, v in r.items()}
                    for r in curve.to_rows()
                ]
            )
            sections.append(_section("learning-curve", "Learning curve", body))
            if scatter is None and attributions is not None:
                scatter = (last, keep, true, f"a refit on the first {curve.sizes[-1]} rows, "
                           f"predicting {label}")  # fmt: skip
    if scatter is not None:
        attr_s, keep, true, label = scatter
        fig = plot_predicted_vs_actual(
            attr_s, keep, true, examples=examples,
            title=f"Predicted vs actual output over {keep.shape[0]} held-out masks",
        )  # fmt: skip
        sections.append(
            _section("predictions", "Predicted vs actual", _img(fig, f"Scatter of {label}"))
        )

    if attributions is not None:
        groups = store.meta["components"] if store is not None else None
        body = _img(
            plot_attribution_map(attributions, groups=groups, absolute=True),
            "Mean |weight| of every component over all examples, laid out by module",
        )
        for e in examples:
            body += f"<h3>Example {e}</h3>"
            rows = [
                {"rank": r + 1, "component": n, "weight": f"{w:+.4f}", "ablating it": _effect(w)}
                for r, (n, w) in enumerate(attributions.top(e, k=top_k))
            ]
            fig = plot_top_components(attributions, e, k=top_k)
            body += (
                f'<div class="row"><div>{_table(rows)}</div>'
                f"<div>{_img(fig, f'Top components of example {e}')}</div></div>"
            )
            body += _img(
                plot_attribution_map(attributions, examples=e, groups=groups),
                f"Weights of example {e}, laid out by module (blue: positive weight, keeping "
                "the component raises the output)",
            )
        sections.append(_section("attributions", "Attributions", body))

    if edits:
        sections.append(_section("edits", "Edits", _edits_html(edits)))

    nav = " ".join(
        f'<a href="#{a}">{h}</a>'
        for a, h in (
            ("settings", "Settings"), ("progress", "Progress"), ("evaluation", "Evaluation"),
            ("learning-curve", "Learning curve"), ("predictions", "Predicted vs actual"),
            ("attributions", "Attributions"), ("edits", "Edits"),
        )
        if any(s.startswith(f'<section id="{a}"') for s in sections)
    )  # fmt: skip
    note_html = "".join(f'<p class="note">{_esc(n)}</p>' for n in notes)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>coarpy report: {_esc(name)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<h1>coarpy report: {_esc(name)}</h1>\n"
        f'<p class="note">Written {_esc(stamp)} by coarpy {_esc(_version())}.</p>\n'
        f"<nav>{nav}</nav>\n{note_html}\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    path = out / REPORT_NAME
    _fs.atomic_write(path, page.encode("utf-8"))
    return path


def _edits_html(edits: Mapping[str, Any]) -> str:
    body = ""
    for name, doc in edits.items():
        body += f"<h3>{_esc(name)}</h3>"
        tables: list[tuple[str, list]] = []
        if isinstance(doc, list):
            tables.append(("", doc))
        elif isinstance(doc, Mapping):
            scalars = {k: v for k, v in doc.items() if not _is_row_list(v)}
            if scalars:
                body += _table(_key_values(scalars))
            tables += [(str(k), v) for k, v in doc.items() if _is_row_list(v)]
        else:
            body += f"<p>{_esc(_cell(doc))}</p>"
        for label, rows in tables:
            if not _is_row_list(rows):
                body += f"<p>{_esc(_cell(rows))}</p>"
                continue
            if label:
                body += f"<h4>{_esc(label)}</h4>"
            body += _table(rows)
            try:
                fig = plot_edit_curve(rows)
            except ReportError:
                continue  # no k column or no metric columns: the table says it all
            body += _img(fig, f"{name} {label}: metrics against k".replace("  ", " "))
    return body


def _is_row_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, Mapping) for r in value)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coarpy")
    except PackageNotFoundError:
        return "(not installed)"


def report_run(
    run: str | os.PathLike,
    *,
    examples: Sequence[int] = (0,),
    out: str | os.PathLike | None = None,
    curve_sizes: Sequence[int] | None = None,
) -> Path:
    """Write ``report.html`` for a run directory from whatever it holds.

    Reads ``RUN/meta.json`` + ``blocks/`` (the store; ``RUN/store/`` as ``coar demo``
    writes it also works), ``RUN/attributions/``, ``RUN/evaluation.json`` and
    ``RUN/edits/*.json``; any of them may be missing.

    Parameters
    ----------
    run : the run directory.
    examples : example indices to detail.
    out : where to write (default: ``run``).
    curve_sizes : as for :func:`write_report`.

    Returns
    -------
    Path of the written ``report.html``.

    Raises
    ------
    ReportError
        If the directory holds none of these, or an edits file is not JSON.
    """
    from .runs import ATTRIBUTIONS, EVALUATION

    run = Path(run)
    if not run.is_dir():
        raise ReportError(f"{run} is not a directory. Pass a run directory (coar collect's path).")
    store = None
    for candidate in (run, run / "store"):
        if (candidate / "meta.json").exists():
            store = ComponentDataset(candidate)
            break
    attributions = None
    if (run / ATTRIBUTIONS).is_dir():
        attributions = Attributions.load(run / ATTRIBUTIONS)
    evaluation = None
    if (run / f"{EVALUATION}.json").exists():
        evaluation = Evaluation.load(run / f"{EVALUATION}.json")
    edits = {}
    for path in sorted((run / "edits").glob("*.json")):
        try:
            edits[path.stem] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ReportError(
                f"{path} is not valid JSON ({err}). Fix or remove it, then rerun the report."
            ) from err
    if store is None and attributions is None and evaluation is None and not edits:
        raise ReportError(
            f"{run} holds no store (meta.json), attributions/, {EVALUATION}.json or edits/. "
            "Collect, fit or evaluate the run first."
        )
    return write_report(
        run if out is None else out,
        evaluation=evaluation,
        attributions=attributions,
        store=store,
        examples=examples,
        edits=edits or None,
        curve_sizes=curve_sizes,
        title=run.resolve().name,
    )
