"""Feature distillation: taps on named layers and the exact spatial-affinity (FAKD) loss.

Depends on nothing but torch. See ``docs/distillation.md`` for the math and benchmarks.
"""

from .affinity import affinity_loss, spatial_affinity
from .distiller import PIXEL_LOSSES, Distiller, pixel_loss
from .taps import FeatureTaps

__all__ = ["PIXEL_LOSSES", "Distiller", "FeatureTaps", "affinity_loss", "pixel_loss", "spatial_affinity"]
