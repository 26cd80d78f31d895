"""Feature distillation: taps on named layers and the exact spatial-affinity (FAKD) loss.

Depends on nothing but torch. See ``docs/distillation.md`` for the math and benchmarks.
"""

from .affinity import affinity_loss, spatial_affinity
from .distiller import Distiller
from .taps import FeatureTaps

__all__ = ["Distiller", "FeatureTaps", "affinity_loss", "spatial_affinity"]
