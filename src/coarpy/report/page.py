"""The report page: one self-contained HTML file that summarises a run.

:func:`write_report` puts a run's settings, progress, evaluation, plots, top
components and edits into ``out/report.html``, with every image embedded as a base64
PNG, so the file can be mailed or archived alone. It draws what it is given and fits
nothing. :func:`report_run` loads what a run directory holds (``coarpy.runs`` layout),
computes a learning curve when the store is small enough to refit cheaply (the one
place the report asks for fits, through :mod:`coarpy.learning_curve`), and calls it.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .. import _fs
from ..attributions import Attributions
from ..errors import ReportError
from ..evaluate import Evaluation
from ..learning_curve import MIN_STORE_ROWS, LearningCurve, store_learning_curve
from ..store import ComponentDataset
from ._inputs import check_examples, component_layout, is_row_list
from .plots import (
    plot_attribution_map,
    plot_correlations,
    plot_edit_curve,
    plot_learning_curve,
    plot_predicted_vs_actual,
    plot_top_components,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

REPORT_NAME = "report.html"
_AUTO_CURVE_MAX_COMPONENTS = 4096  # refits in a report: one (N x N) eigendecomposition each
_AUTO_CURVE_MAX_CELLS = 2**27  # rows * (components + examples) read into memory
_MAX_TABLE_ROWS = 200


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
    from ..runs import status

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


def _heldout_arrays(heldout: Any) -> tuple[Tensor, Tensor]:
    if isinstance(heldout, ComponentDataset):
        return heldout.masks(), heldout.outputs()
    if isinstance(heldout, tuple) and len(heldout) == 2:
        keep, true = heldout
        if isinstance(keep, Tensor) and isinstance(true, Tensor):
            return keep, true
    raise ReportError(
        "heldout must be a ComponentDataset or a tuple (masks (n, N), outputs (n, E)) of "
        f"tensors, got {type(heldout).__name__}."
    )


def write_report(
    out: str | os.PathLike,
    *,
    evaluation: Evaluation | None = None,
    attributions: Attributions | None = None,
    store: ComponentDataset | None = None,
    examples: Sequence[int] = (0,),
    edits: Mapping[str, Any] | None = None,
    heldout: ComponentDataset | tuple[Tensor, Tensor] | None = None,
    curve: LearningCurve | None = None,
    notes: Sequence[str] = (),
    top_k: int = 15,
    title: str | None = None,
) -> Path:
    """Write ``out/report.html``: one self-contained page summarising a run.

    Sections appear for what is given: settings (store and fit), collection progress,
    the evaluation table and correlation histograms, a learning curve and the
    predicted-vs-actual scatter, attribution maps and top components of ``examples``,
    and edits. Nothing is fitted here: pass a ``curve`` computed with
    :mod:`coarpy.learning_curve` to show one (:func:`report_run` does).

    The scatter uses ``attributions`` on ``heldout`` when both are given. Without
    ``heldout`` it uses the curve's largest refit on the curve's held-out masks, and
    says so in the caption.

    Parameters
    ----------
    out : directory to write into (created if missing).
    evaluation, attributions, store : any of a run's results; None leaves a section out.
    examples : example indices whose scatter, attribution map and top components to show.
    edits : ``{name: result}`` where a result is a list of row dicts (drawn with
        :func:`plot_edit_curve` when it has a ``k`` column) or a dict of settings and
        such lists.
    heldout : a held-out store or ``(masks, outputs)`` for the scatter.
    curve : a learning curve to draw, e.g. ``store_learning_curve(store)``.
    notes : lines shown at the top of the page (e.g. why a section is missing).
    top_k : components listed per example.
    title : page title (default: the store's directory name).

    Returns
    -------
    Path of the written ``report.html``.

    Raises
    ------
    ReportError
        If nothing is given to report, the attributions do not match the store, or an
        example index is out of range.
    """
    if evaluation is None and attributions is None and store is None and not edits:
        raise ReportError(
            "write_report got nothing to report: pass evaluation=, attributions=, store= or "
            "edits= (or use report_run(RUN) to load a run directory)."
        )
    if attributions is not None:
        examples = check_examples(attributions, examples)
        if store is not None and list(attributions.names) != store.names:
            raise ReportError(
                f"The attributions are over {attributions.n_components} components that differ "
                f"from the {store.n_components} of the store {store.path}. Pass the store the "
                "attributions were fitted on."
            )
    if curve is not None and not isinstance(curve, LearningCurve):
        raise ReportError(
            f"curve must be a LearningCurve, got {type(curve).__name__}. Compute one with "
            "coarpy.learning_curve.store_learning_curve(store)."
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = title or (store.path.name if store is not None else out.resolve().name)
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
                for m, k, n, _ in component_layout(store.names, store.meta["components"])
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
        keep, true = _heldout_arrays(heldout)
        scatter = (attributions, keep, true, f"the attributions on {keep.shape[0]} held-out masks")
    if curve is not None:
        body = _img(
            plot_learning_curve(curve),
            f"Mean held-out correlation against training masks ({curve.method} refits; "
            f"correlations over {curve.heldout})",
        )
        body += _table(
            [
                {k: f"{v:.3f}" if isinstance(v, float) else v for k, v in r.items()}
                for r in curve.to_rows()
            ]
        )
        sections.append(_section("learning-curve", "Learning curve", body))
        if scatter is None and attributions is not None and curve.final is not None:
            scatter = (curve.final, curve.keep, curve.true, f"a refit on the first "
                       f"{curve.sizes[-1]} rows, predicting {curve.heldout}")  # fmt: skip
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
            ids = attributions.example_ids
            named = "" if ids is None else f" (id {html.escape(repr(ids[e]))})"
            body += f"<h3>Example {e}{named}</h3>"
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
            scalars = {k: v for k, v in doc.items() if not is_row_list(v)}
            if scalars:
                body += _table(_key_values(scalars))
            tables += [(str(k), v) for k, v in doc.items() if is_row_list(v)]
        else:
            body += f"<p>{_esc(_cell(doc))}</p>"
        for label, rows in tables:
            if not is_row_list(rows):
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coarpy")
    except PackageNotFoundError:
        return "(not installed)"


def _report_curve(
    store: ComponentDataset | None,
    attributions: Attributions | None,
    curve_sizes: Sequence[int] | None,
    notes: list[str],
) -> LearningCurve | None:
    """The run's learning curve, or None with a note why not: the report's only fits.

    ``curve_sizes=()`` asks for none; None asks for the default sizes, only on stores
    small enough to refit cheaply; explicit sizes always compute it.
    """
    if store is None or (curve_sizes is not None and not len(curve_sizes)):
        return None
    if curve_sizes is None:
        cells = len(store) * (store.n_components + store.n_examples)
        if store.n_components > _AUTO_CURVE_MAX_COMPONENTS or cells > _AUTO_CURVE_MAX_CELLS:
            notes.append(
                f"Learning curve skipped: refitting {store.n_components} components on "
                f"{len(store)} rows is too heavy for a report. Pass curve_sizes= to force it."
            )
            return None
    if len(store) < MIN_STORE_ROWS:
        notes.append(
            f"Learning curve skipped: the store has {len(store)} finished rows; at least "
            f"{MIN_STORE_ROWS} are needed to fit on some and hold out the rest."
        )
        return None
    method = attributions.meta.get("method") if attributions is not None else None
    method = method if method in ("ridge", "ols", "lasso") else "ridge"
    return store_learning_curve(store, sizes=curve_sizes, method=method, seed=0)


def report_run(
    run: str | os.PathLike,
    *,
    examples: Sequence[int] = (0,),
    out: str | os.PathLike | None = None,
    curve_sizes: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """Write ``report.html`` for a run directory from whatever it holds.

    Reads ``RUN/meta.json`` + ``blocks/`` (the store; ``RUN/store/`` as ``coar demo``
    writes it also works), ``RUN/attributions/``, ``RUN/evaluation.json`` and
    ``RUN/edits/*.json``; any of them may be missing. With a store, the page shows a
    learning curve (:func:`coarpy.learning_curve.store_learning_curve`, holding out
    the store's last rows) when refitting is cheap.

    Parameters
    ----------
    run : the run directory.
    examples : example indices to detail.
    out : where to write (default: ``run``).
    curve_sizes : training sizes of the learning curve; ``()`` leaves it out. By
        default six sizes, skipped for stores too large to refit cheaply (a note on
        the page says so).
    title : page title (default: the run directory's name).

    Returns
    -------
    Path of the written ``report.html``.

    Raises
    ------
    ReportError
        If the directory holds none of these, or an edits file is not JSON.
    """
    from ..runs import ATTRIBUTIONS, EVALUATION

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
    if attributions is not None:
        examples = check_examples(attributions, examples)  # before any refit
    notes: list[str] = []
    curve = _report_curve(store, attributions, curve_sizes, notes)
    return write_report(
        run if out is None else out,
        evaluation=evaluation,
        attributions=attributions,
        store=store,
        examples=examples,
        edits=edits or None,
        curve=curve,
        notes=notes,
        title=title or run.resolve().name,
    )
