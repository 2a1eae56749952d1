"""Fusion operators: one file per operator, registered in ``fusionkit.registry.FUSIONS``.

See :mod:`fusionkit.fusion.base` for the protocol (sites, what an operator receives and returns).
"""

from fusionkit.fusion import bca  # noqa: F401 - registers the operator
from fusionkit.fusion.base import SITES, FusionOp, SiteState

__all__ = ["SITES", "FusionOp", "SiteState"]
