"""fusionkit: a modular multimodal fusion toolkit for PyTorch.

``import fusionkit`` registers every built-in expert, fusion operator, head, frontend, dataset,
attention kernel, window and modality; ``fusionkit.registry`` holds the registries.
"""

from fusionkit import attention, data, experts, frontends, fusion, heads  # noqa: F401 - imported to register built-ins
from fusionkit.adapters import Adapter, attach_adapters
from fusionkit.converters import convert
from fusionkit.recipes import build, list_recipes, load_recipe, register_recipe_dir
from fusionkit.trainable import TrainablePolicy, trainable_report
from fusionkit.registry import DATASETS, EXPERTS, FRONTENDS, FUSIONS, HEADS, KERNELS, MODALITIES, REGISTRIES, WINDOWS

__version__ = "0.1.0"

__all__ = ["build", "convert", "list_recipes", "load_recipe", "register_recipe_dir", "Adapter", "TrainablePolicy", "attach_adapters", "trainable_report", "DATASETS", "EXPERTS", "FRONTENDS", "FUSIONS", "HEADS", "KERNELS", "MODALITIES", "REGISTRIES", "WINDOWS", "__version__"]
