"""Reports: plots of a run's results and one self-contained HTML page. Draws, never fits.

- :mod:`coarpy.report.plots`: every ``plot_*`` figure (matplotlib, Agg canvas, no
  pyplot), for attributions, evaluations, learning curves and edits.
- :mod:`coarpy.report.page`: :func:`write_report` (the HTML page from given results)
  and :func:`report_run` (the page of a run directory, as ``coar report`` writes it).

Learning curves are computed by :mod:`coarpy.learning_curve`; the report draws them.
matplotlib is the optional extra ``coarpy[report]``, imported only when drawing.
"""

from .page import REPORT_NAME, report_run, write_report
from .plots import (
    plot_attribution_map,
    plot_correlations,
    plot_edit_curve,
    plot_learning_curve,
    plot_predicted_vs_actual,
    plot_top_components,
)

__all__ = [
    "REPORT_NAME",
    "plot_attribution_map",
    "plot_correlations",
    "plot_edit_curve",
    "plot_learning_curve",
    "plot_predicted_vs_actual",
    "plot_top_components",
    "report_run",
    "write_report",
]
