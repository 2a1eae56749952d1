"""Data: manifests of real media files, PyAV decoding, clip sampling, transforms, datasets.

Every module of this package is imported here, so datasets register themselves in
``fusionkit.registry.DATASETS`` and a new one is one new file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
