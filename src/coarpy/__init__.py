"""coarpy: component attribution via regression (COAR) for any PyTorch model.

Decompose a model's predictions into the effects of its components (conv filters,
attention heads, MLP neurons), evaluate the decomposition, and edit the model with it.
"""

from . import baselines, edit, families, outputs
from .ablation import ablate, apply_ablation
from .attributions import Attributions
from .collect import collect
from .components import Components
from .errors import CoarError
from .evaluate import Evaluation, evaluate, evaluate_store
from .regression import fit
from .stopping import StopRule
from .store import ComponentDataset

__version__ = "0.1.0"

__all__ = [
    "Attributions",
    "CoarError",
    "ComponentDataset",
    "Components",
    "Evaluation",
    "StopRule",
    "ablate",
    "apply_ablation",
    "baselines",
    "edit",
    "families",
    "collect",
    "evaluate",
    "evaluate_store",
    "fit",
    "outputs",
]
