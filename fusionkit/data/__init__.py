"""Data: manifests of real media files, PyAV decoding, clip sampling, transforms, datasets.

Every module of this package is imported here, so datasets register themselves in
``fusionkit.registry.DATASETS`` and a new one is one new file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from fusionkit.data.collate import Skipped, collate  # noqa: E402 - after the registering imports
from fusionkit.data.dataset import ManifestDataset, MissingAudioError  # noqa: E402
from fusionkit.data.decode import DecodeError  # noqa: E402
from fusionkit.data.load_inputs import load_inputs  # noqa: E402
from fusionkit.data.loader import build_loader, seed_worker, worker_init_fn  # noqa: E402

__all__ = ["DecodeError", "ManifestDataset", "MissingAudioError", "Skipped", "build_loader", "collate",
           "load_inputs", "seed_worker", "worker_init_fn"]
