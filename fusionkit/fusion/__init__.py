"""Fusion operators: one file per operator, registered in ``fusionkit.registry.FUSIONS``.

Every module of this package is imported here, so a new operator is one new file with a
``@FUSIONS.register`` decorator (plus a recipe): nothing else changes. See
:mod:`fusionkit.fusion.base` for the protocol (sites, what an operator receives and returns).
"""

import importlib
import pkgutil

from fusionkit.fusion.base import SITES, FusionOp, SiteState

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SITES", "FusionOp", "SiteState"]
