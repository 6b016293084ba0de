"""Coar-Edit: change a model's behaviour on some examples by ablating a few components.

Given attributions over a set of examples, *targets* (the behaviour to change) and
*references* (the behaviour to keep), every component gets Welch's t statistic between
its attribution weights on the two sets; ablating the most negative raises the target
outputs relative to the references, the most positive lowers them. Any
:class:`~coarpy.attributions.Attributions` works, COAR's or a baseline's, so editing
with COAR can be compared with leave-one-out and gradient attributions.

The parts, one module each:

- ``scoring``: Welch t ``scores``, ``select`` the ``k`` to ablate, ``apply`` them (a
  weight-zeroed copy, through :func:`coarpy.ablation.apply_ablation`).
- ``measuring``: ``sweep`` (run the model under edits of growing size), ``measure`` (the
  same columns for a model as it is), and the stop rules ``smallest_k``,
  ``largest_k_within``, ``best_k``.
- ``record``: the :class:`Edit` record (save/load as JSON beside a plain state_dict),
  ``load_state_dict``, and ``make`` (score, select, measure, record in one call).
- ``rundir``: ``edit_run``, the same over a run directory (``coar edit``).

Entry points that run the model take ``(attributions, model, components, data, *,
targets=, references=, ..., progress=)``; ``measure`` takes ``(model, data, *, ...)``.
"""

from ._checks import DIRECTIONS, Rows, check_compatible
from .measuring import Metric, best_k, largest_k_within, measure, smallest_k, sweep
from .record import FORMAT, VERSION, Edit, load_state_dict, make
from .rundir import EDITS, edit_run
from .scoring import apply, scores, select

__all__ = [
    "DIRECTIONS",
    "EDITS",
    "FORMAT",
    "VERSION",
    "Edit",
    "Metric",
    "Rows",
    "apply",
    "best_k",
    "check_compatible",
    "edit_run",
    "largest_k_within",
    "load_state_dict",
    "make",
    "measure",
    "scores",
    "select",
    "smallest_k",
    "sweep",
]
