"""Coar-Edit: change a model's behaviour on some examples by ablating a few components.

Given attributions over a set of examples, *targets* (the behaviour to change) and
*references* (the behaviour to keep), every component gets a t statistic between its
attribution weights on the two sets (Welch's, the paper's, or a paired t where each
target is a reference with the feature to edit added); ablating the most negative
raises the target outputs relative to the references, the most positive lowers them.
Any :class:`~coarpy.attributions.Attributions` works, COAR's or a baseline's, so
editing with COAR can be compared with leave-one-out and gradient attributions, and
with the oracle, the greedy edit found by running the model.

The parts, one module each:

- ``scoring``: t ``scores`` (``statistic="welch"`` or ``"paired"``), ``select`` the
  ``k`` to ablate, ``apply`` them (a weight-zeroed copy, through
  :func:`coarpy.ablation.apply_ablation`).
- ``objective``: the :class:`Objective` an edit should achieve (target gain against
  reference damage), and ``select_predicted``, the greedy choice on the attributions'
  own predictions of both.
- ``search``: greedy edits measured on the model: ``refine`` (the attributions
  propose, the model decides) and ``oracle`` (the model alone), returning a
  :class:`Search`.
- ``measuring``: ``sweep`` (run the model under edits of growing size, in score
  order or any ``order=``), ``measure`` (the same columns for a model as it is), and
  the stop rules ``smallest_k``, ``largest_k_within``, ``best_k``.
- ``record``: the :class:`Edit` record (save/load as JSON beside a plain state_dict),
  ``load_state_dict``, and ``make`` (score, select, measure, record in one call).
- ``rundir``: ``edit_run``, the same over a run directory (``coar edit``).

Entry points that run the model take ``(attributions, model, components, data, *,
targets=, references=, ..., progress=)``; ``measure`` takes ``(model, data, *, ...)``
and ``oracle``, which uses no attributions, ``(model, components, data, *, ...)``.
"""

from ._checks import DIRECTIONS, STATISTICS, Rows, check_compatible
from .measuring import Metric, best_k, largest_k_within, measure, smallest_k, sweep
from .objective import QUANTITIES, Objective, select_predicted
from .record import FORMAT, VERSION, Edit, load_state_dict, make
from .rundir import EDITS, edit_run
from .scoring import apply, scores, select
from .search import Search, oracle, refine

__all__ = [
    "DIRECTIONS",
    "EDITS",
    "FORMAT",
    "QUANTITIES",
    "STATISTICS",
    "VERSION",
    "Edit",
    "Metric",
    "Objective",
    "Rows",
    "Search",
    "apply",
    "best_k",
    "check_compatible",
    "edit_run",
    "largest_k_within",
    "load_state_dict",
    "make",
    "measure",
    "oracle",
    "refine",
    "scores",
    "select",
    "select_predicted",
    "smallest_k",
    "sweep",
]
