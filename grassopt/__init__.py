"""grassopt: memory-efficient training with optimizers in moving low-rank gradient subspaces.

Quick start::

    import grassopt
    opt = grassopt.SubspaceAdamW(grassopt.param_groups(model, preset="subtrack++", rank=128), lr=1e-3)
"""

from . import bases, qlinear
from .memory import expected_state_elements, state_breakdown, state_bytes
from .optimizer import SUBSPACE_DEFAULTS, SubspaceAdamW
from .presets import PRESETS, make_optimizer, param_groups, resolve_preset
from .rules import RULES
from .targets import select_targets
from .transport import TRANSPORTS

__version__ = "0.1.0"

__all__ = [
    "SubspaceAdamW",
    "param_groups",
    "make_optimizer",
    "select_targets",
    "resolve_preset",
    "PRESETS",
    "RULES",
    "TRANSPORTS",
    "SUBSPACE_DEFAULTS",
    "state_bytes",
    "state_breakdown",
    "expected_state_elements",
    "qlinear",
    "bases",
]
