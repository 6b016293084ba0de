"""coarpy: component attribution via regression (COAR) for any PyTorch model."""

from . import outputs
from .ablation import ablate, apply_ablation
from .components import Components
from .errors import CoarError

__version__ = "0.1.0"

__all__ = ["CoarError", "Components", "ablate", "apply_ablation", "outputs"]
