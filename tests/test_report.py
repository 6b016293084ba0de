"""Tests of coarpy.report (plots, HTML report).

The real data: a store of 300 masks (alpha 0.1) over the 56 conv channels and hidden
units of the digits CNN, on 24 held-out digits, and a held-out store of 60 masks
drawn with another seed.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from coarpy import report, runs  # noqa: E402
from coarpy.attributions import Attributions  # noqa: E402
from coarpy.collect import collect  # noqa: E402
from coarpy.components import Components  # noqa: E402
from coarpy.errors import MissingExtraError, ReportError  # noqa: E402
from coarpy.evaluate import Evaluation, evaluate_store  # noqa: E402
from coarpy.learning_curve import learning_curve, store_learning_curve  # noqa: E402
from coarpy.regression import fit  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
SPEC = {"features.0": "conv", "features.4": "conv", "classifier.1": "linear"}
SECTIONS = ["settings", "progress", "evaluation", "learning-curve", "predictions"]
SECTIONS += ["attributions", "edits"]
HOSTILE = "<script>alert('x')</script> & \"quotes\""
EDIT_ROWS = [
    {"k": 4, "target_acc": 0.55, "reference_acc": 0.88},
    {"k": 0, "target_acc": 0.40, "reference_acc": 0.90},
    {"k": 8, "target_acc": 0.70, "reference_acc": 0.85},
]


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(trained_cnn, digits, tmp_path_factory):
    """A run directory (store, attributions, evaluation), its held-out store, and more."""
    root = tmp_path_factory.mktemp("report")
    net = copy.deepcopy(trained_cnn)
    comps = Components.from_spec(net, SPEC)
    _, _, x, y = digits
    data = (x[:24], y[:24])
    common = dict(output="margin", alpha=0.1, batch_size=4096, progress=False)
    ds = collect(net, comps, data, path=root / "run", n_masks=300, seed=0, block_size=50, **common)
    heldout = collect(
        net, comps, data, path=root / "heldout", n_masks=60, seed=1, block_size=60, **common
    )
    attr = fit(ds, progress=False)
    attr.save(root / "run" / runs.ATTRIBUTIONS)
    few = fit((ds.masks()[:60], ds.outputs()[:60]), progress=False)
    few = Attributions(weights=few.weights, bias=few.bias, names=attr.names)
    evaluation = evaluate_store({"coar": attr, "coar_60_masks": few}, heldout)
    evaluation.save(root / "run" / f"{runs.EVALUATION}.json")
    return SimpleNamespace(
        root=root, ds=ds, heldout=heldout, attr=attr, evaluation=evaluation, comps=comps
    )


@pytest.fixture(scope="module")
def html_report(run, tmp_path_factory):
    """write_report with everything, one example, a two-point learning curve."""
    out = tmp_path_factory.mktemp("html")
    path = report.write_report(
        out,
        evaluation=run.evaluation,
        attributions=run.attr,
        store=run.ds,
        examples=[3],
        edits={HOSTILE: {"note": HOSTILE, "curve": EDIT_ROWS}},
        heldout=run.heldout,
        curve=store_learning_curve(run.ds, heldout=run.heldout, sizes=(60, 300)),
    )
    return path


class _Page(HTMLParser):
    """Section ids, image sources, tags seen, and the text of a page."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.tags, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _decode_png(src: str):
    from PIL import Image

    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    data = base64.b64decode(src[len(prefix) :], validate=True)
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every pixel; raises on a truncated or corrupt PNG
    return image


# -- figures ---------------------------------------------------------------------------


def test_figures_draw_on_an_agg_canvas_outside_pyplot(run):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = report.plot_top_components(run.attr, 0, k=5)
    assert isinstance(fig.canvas, FigureCanvasAgg)
    assert fig.canvas.manager is None  # pyplot figures have a manager (and may open windows)


def test_plots_without_matplotlib_say_which_extra_to_install(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'coarpy\[report\]'"):
        report.plot_top_components(run.attr, 0)


def test_scatter_plots_every_masks_prediction_with_the_evaluations_pearson_r(run):
    keep, true = run.heldout.masks(), run.heldout.outputs()
    fig = report.plot_predicted_vs_actual(run.attr, keep, true, examples=[0, 7])
    pred = run.attr.predict(keep)
    r = run.evaluation.per_example("coar").pearson  # the same masks: the same r
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2
    for ax, e in zip(panels, [0, 7], strict=True):
        points = np.asarray(ax.collections[0].get_offsets())
        np.testing.assert_allclose(points, torch.stack([true[:, e], pred[:, e]], 1).numpy())
        assert ax.get_title() == f"example {e}: r = {float(r[e]):.2f}"
        assert f"{np.corrcoef(true[:, e], pred[:, e])[0, 1]:.2f}" in ax.get_title()


def test_scatter_rejects_masks_over_other_components(run):
    keep, true = run.heldout.masks(), run.heldout.outputs()
    with pytest.raises(ReportError, match=r"keep must have shape \(n_masks, 56\)"):
        report.plot_predicted_vs_actual(run.attr, keep[:, :10], true)
    with pytest.raises(ReportError, match="out of range: the attributions cover 24"):
        report.plot_predicted_vs_actual(run.attr, keep, true, examples=[24])


def test_correlation_histograms_give_each_methods_mean_and_count_per_alpha():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(2, 3, 10, generator=g, dtype=torch.float64) * 2 - 1  # (M, A, E)
    values[1, 2, :4] = torch.nan
    ev = Evaluation(
        attribution_names=("coar", "loo"), alphas=(0.05, 0.1, 0.2), n_masks=50, pearson=values,
        spearman=values, n_constant=(0, 0, 4),
    )  # fmt: skip
    fig = report.plot_correlations(ev)
    assert [ax.get_title() for ax in fig.axes] == ["alpha = 0.05", "alpha = 0.1", "alpha = 0.2"]
    for a, ax in enumerate(fig.axes):
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        for m, method in enumerate(("coar", "loo")):
            r = values[m, a][~values[m, a].isnan()]
            assert labels[m] == f"{method} (mean {float(r.mean()):.2f}, n={len(r)})"
    assert "n=6" in fig.axes[2].get_legend().get_texts()[1].get_text()


def test_learning_curve_of_the_digits_store_rises_and_is_drawn(run):
    keep, true = run.heldout.masks(), run.heldout.outputs()
    curve = learning_curve(run.ds, keep, true, sizes=(40, 300))
    assert curve.pearson.shape == (2, 24)
    assert curve.mean_pearson[1] > curve.mean_pearson[0] + 0.05
    fig = report.plot_learning_curve(curve)
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [40, 300]
    np.testing.assert_allclose(line.get_ydata(), curve.mean_pearson.numpy())
    assert [r["n_masks"] for r in curve.to_rows()] == [40, 300]


def _hand_attributions() -> Attributions:
    names = [f"a:{u}" for u in range(3)] + [f"b.c:{u}" for u in range(5)]
    weights = torch.tensor(
        [[1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 0.25, 2.0], [3.0, 2.0, -0.5, 1.0, -3.0, 1.0, 0.75, 0.0]]
    )
    return Attributions(weights=weights, bias=torch.zeros(2), names=names)


def _image(ax) -> np.ma.MaskedArray:
    return ax.images[0].get_array()


def test_attribution_map_puts_each_module_on_a_row_padded_to_the_widest():
    attr = _hand_attributions()
    fig = report.plot_attribution_map(attr, examples=0)
    grid = _image(fig.axes[0])
    assert grid.shape == (2, 5)
    np.testing.assert_array_equal(grid.mask, [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(grid[0, :3], [1.0, -2.0, 0.5])
    np.testing.assert_array_equal(grid[1], [0.0, 3.0, -1.0, 0.25, 2.0])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a", "b.c"]
    assert ax_limits_symmetric(fig.axes[0])


def ax_limits_symmetric(ax) -> bool:
    lo, hi = ax.images[0].get_clim()
    return lo == -hi == -3.0


def test_attribution_map_averages_examples_and_splits_kinds_into_panels():
    attr = _hand_attributions()
    groups = [["a", "conv", 3], ["b.c", "linear", 5]]
    fig = report.plot_attribution_map(attr, examples=[0, 1], groups=groups)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_xlabel() for ax in panels] == ["unit (conv)", "unit (linear)"]
    np.testing.assert_array_equal(_image(panels[0])[0], [2.0, 0.0, 0.0])
    np.testing.assert_array_equal(_image(panels[1])[0], [0.5, 0.0, 0.0, 0.5, 1.0])
    fig = report.plot_attribution_map(attr, groups=groups, absolute=True)  # all examples
    np.testing.assert_array_equal(_image(fig.axes[0])[0], [2.0, 2.0, 0.5])
    assert fig.axes[0].images[0].get_clim() == (0.0, 3.0)


def test_attribution_map_lays_out_a_real_store_by_its_components(run):
    fig = report.plot_attribution_map(run.attr, examples=2, groups=run.comps)
    conv, linear = (ax for ax in fig.axes if ax.images)
    w = run.attr.weights[2].double()
    np.testing.assert_allclose(_image(conv)[0, :8], w[:8])
    np.testing.assert_allclose(_image(conv)[1], w[8:24])
    np.testing.assert_allclose(_image(linear)[0], w[24:])


def test_attribution_map_rejects_groups_of_another_model():
    with pytest.raises(ReportError, match="groups hold 4 components but the attributions have 8"):
        report.plot_attribution_map(_hand_attributions(), groups=[["a", "conv", 4]])


def test_top_components_are_the_largest_weights_with_their_signs(run):
    fig = report.plot_top_components(run.attr, 5, k=6)
    ax = fig.axes[0]
    top = run.attr.top(5, k=6)
    widths = [p.get_width() for p in ax.patches]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [n for n, _ in top][::-1]  # largest |weight| at the top
    np.testing.assert_allclose(widths, [w for _, w in top][::-1], rtol=1e-6)
    reds = [p.get_width() < 0 for p in ax.patches]
    from matplotlib.colors import to_hex

    assert [to_hex(p.get_facecolor()) == "#b2182b" for p in ax.patches] == reds


def test_edit_curve_draws_target_and_reference_columns_sorted_by_k():
    fig = report.plot_edit_curve(EDIT_ROWS)
    target, reference = fig.axes[0].lines
    assert target.get_label() == "target_acc" and reference.get_label() == "reference_acc"
    np.testing.assert_array_equal(target.get_xdata(), [0, 4, 8])
    np.testing.assert_array_equal(target.get_ydata(), [0.40, 0.55, 0.70])
    np.testing.assert_array_equal(reference.get_ydata(), [0.90, 0.88, 0.85])
    table = {"n": [2, 1], "worst_group": [0.7, 0.6], "clean": [0.9, 0.91]}
    fig = report.plot_edit_curve(table, k="n", target="worst_group", reference=["clean"])
    assert [line.get_label() for line in fig.axes[0].lines] == ["worst_group", "clean"]
    np.testing.assert_array_equal(fig.axes[0].lines[1].get_ydata(), [0.91, 0.9])


def test_edit_curve_gives_each_method_one_colour_for_its_target_and_reference():
    methods = ["coar", "loo", "gradient", "random", "oracle"]
    rows = [
        {"k": k, **{f"{m}_target_acc": 0.1 * k + i for i, m in enumerate(methods)},
         **{f"{m}_ref_acc": 0.9 - 0.01 * k for m in methods}}
        for k in range(3)
    ]  # fmt: skip
    lines = {line.get_label(): line for line in report.plot_edit_curve(rows).axes[0].lines}
    colours = [lines[f"{m}_target_acc"].get_color() for m in methods]
    assert len(set(colours)) == len(methods)  # five methods, five colours
    assert colours == [lines[f"{m}_ref_acc"].get_color() for m in methods]
    assert {lines[f"{m}_ref_acc"].get_linestyle() for m in methods} == {"--"}


def test_edit_curve_names_the_columns_it_could_not_find():
    with pytest.raises(ReportError, match=r"No column 'acc' in the table; it has \['k', "):
        report.plot_edit_curve(EDIT_ROWS, target="acc")
    with pytest.raises(ReportError, match="No numeric metric columns to plot"):
        report.plot_edit_curve([{"k": 1, "x": 2, "target": "high"}])
    with pytest.raises(ReportError, match="Column 'target' must hold numbers only"):
        report.plot_edit_curve([{"k": 1, "target": "high"}], target="target")


# -- HTML ------------------------------------------------------------------------------


def test_report_has_every_section_and_only_decodable_png_images(html_report, run):
    assert html_report.name == "report.html"
    page = _parse(html_report)
    assert page.sections == SECTIONS
    # correlations, learning curve, scatter, mean map, example 3's bars and map, edit curve
    assert len(page.images) == 7
    sizes = [_decode_png(src).size for src in page.images]
    assert all(w > 200 and h > 100 for w, h in sizes)
    text = " ".join(page.text)
    mean = run.evaluation.to_rows()[0]["pearson_mean"]
    assert f"{mean:.3f}" in text
    for name, _ in run.attr.top(3, k=15):
        assert name in text
    assert "Example 3" in text


def test_report_escapes_text_it_did_not_write(html_report):
    page = _parse(html_report)
    assert "script" not in page.tags  # the hostile edit name stays text
    assert page.text.count(HOSTILE) >= 2  # the heading and the note's value
    assert HOSTILE not in html_report.read_text(encoding="utf-8")


def test_report_run_reads_what_a_run_directory_holds(run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run.root / "run", folder)
    (folder / "edits").mkdir()
    (folder / "edits" / "fix.json").write_text(json.dumps(EDIT_ROWS))
    path = report.report_run(folder, examples=[1])
    assert path == folder / "report.html"
    page = _parse(path)
    assert page.sections == SECTIONS
    text = " ".join(page.text)
    # No held-out store in a run directory: the curve holds out the store's last rows.
    assert "last 60 rows, held out from every refit" in text
    assert "Example 1" in text and "fix" in text
    assert all(_decode_png(src) for src in page.images)


def test_report_run_without_results_says_what_is_missing(tmp_path):
    with pytest.raises(ReportError, match="holds no store"):
        report.report_run(tmp_path)


def test_report_run_names_an_edits_file_that_is_not_json(run, tmp_path):
    (tmp_path / "edits").mkdir()
    (tmp_path / "edits" / "broken.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"broken\.json is not valid JSON"):
        report.report_run(tmp_path)


def test_write_report_refuses_attributions_of_another_store(run, tmp_path):
    other = Attributions(
        weights=run.attr.weights[:, :50], bias=run.attr.bias, names=run.attr.names[:50]
    )
    with pytest.raises(ReportError, match="Pass the store the attributions were fitted on"):
        report.write_report(tmp_path, attributions=other, store=run.ds)


def test_write_report_draws_what_it_is_given_and_never_fits(run, tmp_path, monkeypatch):
    import coarpy.learning_curve
    import coarpy.regression

    def no_fit(*args, **kwargs):
        raise AssertionError("the report fitted attributions")

    monkeypatch.setattr(coarpy.regression, "fit", no_fit)
    monkeypatch.setattr(coarpy.learning_curve, "fit", no_fit)
    path = report.write_report(tmp_path, attributions=run.attr, store=run.ds, examples=[0])
    sections = _parse(path).sections
    assert "learning-curve" not in sections and "predictions" not in sections
    assert "attributions" in sections


def test_report_run_leaves_the_curve_out_when_asked(run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run.root / "run", folder)
    page = _parse(report.report_run(folder, curve_sizes=()))
    assert "learning-curve" not in page.sections and "predictions" not in page.sections


MATHTEXT = ["blk$\\frac{$:0", "blk$\\frac{$:1", "a$x_$:0", "odd$:0"]  # invalid mathtext


def test_names_with_dollar_signs_are_drawn_literally_not_as_mathtext(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    attr = Attributions(
        weights=torch.tensor([[1.0, -2.0, 0.5, 3.0]]), bias=torch.zeros(1), names=MATHTEXT
    )
    fig = report.plot_top_components(attr, 0, k=4)
    FigureCanvasAgg(fig).draw()  # mathtext would fail to parse these names here
    shown = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert [t.replace("\\$", "$") for t in shown] == [n for n, _ in attr.top(0, k=4)][::-1]
    fig = report.plot_attribution_map(attr, examples=0)
    FigureCanvasAgg(fig).draw()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
        "blk\\$\\frac{\\$",
        "a\\$x_\\$",
        "odd\\$",
    ]
    fig = report.plot_edit_curve([{"k": 0, "target $x_$": 0.5}, {"k": 1, "target $x_$": 0.7}])
    FigureCanvasAgg(fig).draw()
    ev = Evaluation(
        attribution_names=("$\\beta_$",), alphas=(0.1,), n_masks=5, pearson=torch.zeros(1, 1, 3),
        spearman=torch.zeros(1, 1, 3), n_constant=(0,),
    )  # fmt: skip
    FigureCanvasAgg(report.plot_correlations(ev)).draw()
    path = report.write_report(tmp_path, attributions=attr, examples=[0], title="run $x_$")
    assert len(_parse(path).images) == 3  # the mean map, example 0's bars and map


_PROBE = """<script>
window.__errors = 0;
window.addEventListener("error", function () { window.__errors += 1; }, true);
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = "images=" + imgs.length + " decoded=" + ok.length + " errors=" +
    window.__errors;
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (Debian: apt-get install chromium)"
)
def test_report_renders_in_headless_chromium_with_every_image_decoded(html_report, tmp_path):
    page = tmp_path / "page.html"
    text = html_report.read_text(encoding="utf-8")
    # The probe goes first in <head>, so its error listener sees every later failure.
    page.write_text(text.replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8")
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"images=(\d+) decoded=(\d+) errors=(\d+)", done.stdout)
    assert found, done.stdout[-2000:]
    images, decoded, errors = map(int, found.groups())
    assert (images, decoded, errors) == (7, 7, 0)
