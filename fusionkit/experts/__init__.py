"""Experts: frozen pretrained networks that turn a modality into tokens with a layout.

Every module of this package is imported here, so ``import fusionkit`` registers the built-in
experts (``fusionkit list`` shows them) and a new expert is one new file.
"""

import importlib
import pkgutil

from fusionkit.experts.ast import AST
from fusionkit.experts.base import Expert, FrameSelect, Tokens
from fusionkit.experts.block import Block
from fusionkit.experts.clip_vit import ClipViT
from fusionkit.experts.shared import SharedExpert
from fusionkit.experts.timm_cnn import TimmCNN
from fusionkit.experts.timm_vit import TimmViT
from fusionkit.experts.videomae import VideoMAEViT

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["AST", "Block", "ClipViT", "Expert", "FrameSelect", "SharedExpert", "TimmCNN", "TimmViT", "Tokens",
           "VideoMAEViT"]
