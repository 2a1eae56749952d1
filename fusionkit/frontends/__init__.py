"""Signal front-ends (waveform -> features).

Every module of this package is imported here, so ``import fusionkit`` registers the built-in
front-ends (``fusionkit list`` shows them) and a new one is one new file.
"""

import importlib
import pkgutil

from fusionkit.frontends.fbank import AUDIOSET_MEAN, AUDIOSET_STD, KaldiFbank

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["AUDIOSET_MEAN", "AUDIOSET_STD", "KaldiFbank"]
