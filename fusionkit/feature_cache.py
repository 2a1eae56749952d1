"""Frozen-feature cache: an expert's tokens computed once per clip while nothing trainable touches them.

When no trainable parameter, stochastic module or fusion operator sits inside or before the first
``P`` steps of an expert (identity and ensemble baselines, late fusion, heads-only training, the
frozen prefix of operators that start late), the expert's tokens after those ``P`` steps depend only
on its frozen weights and its input. :class:`FusionModel` then takes them from this cache instead of
recomputing them, across epochs and across models of one process (an ablation's variants).

Keys: ``(expert fingerprint, P, digest of the sample's input tensor)``; the fingerprint hashes the
expert's whole state dict, the digest the exact bytes of the (decoded, augmented) input, so a new
augmentation draw or other weights are a miss, never a stale hit. Values: ``(L, D)`` CPU tensors
(the layout is kept per key prefix). The cache is active inside ``with enabled(cache):`` only.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fusionkit.attention import TokenLayout

_ACTIVE: list[FeatureCache] = []


@dataclass
class FeatureCache:
    """An in-memory store of per-sample expert tokens (see the module docstring).

    Args:
        max_gb: stop adding entries beyond this many GB (entries already there stay usable).
    """

    max_gb: float = 8.0
    hits: int = 0
    misses: int = 0
    full: int = 0
    nbytes: int = 0
    _store: dict[tuple[str, int, bytes], Tensor] = field(default_factory=dict, repr=False)
    _layouts: dict[tuple[str, int], TokenLayout] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self._store)

    def get(self, owner: str, steps: int, digests: list[bytes]) -> tuple[Tensor, TokenLayout] | None:
        """Stacked tokens ``(B, L, D)`` and their layout if every sample is cached, else ``None``."""
        rows = [self._store.get((owner, steps, d)) for d in digests]
        if any(r is None for r in rows):
            self.misses += len(digests)
            return None
        self.hits += len(digests)
        return torch.stack(rows), self._layouts[(owner, steps)]

    def put(self, owner: str, steps: int, digests: list[bytes], x: Tensor, layout: TokenLayout) -> None:
        """Store the tokens ``x`` ``(B, L, D)`` of ``len(digests)`` samples."""
        self._layouts[(owner, steps)] = layout
        for d, row in zip(digests, x.detach().to("cpu", copy=True)):
            key = (owner, steps, d)
            if key in self._store:
                continue
            size = row.numel() * row.element_size()
            if self.nbytes + size > self.max_gb * 1e9:
                self.full += 1
                continue
            self._store[key] = row
            self.nbytes += size

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {"entries": float(len(self)), "gb": self.nbytes / 1e9, "hit_rate": self.hits / total if total else 0.0}


def active() -> FeatureCache | None:
    """The cache of the innermost ``enabled`` block, if any."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def enabled(cache: FeatureCache | None) -> Iterator[FeatureCache | None]:
    """Use ``cache`` for every :class:`FusionModel` forward inside the block (``None``: no-op)."""
    if cache is None:
        yield None
        return
    _ACTIVE.append(cache)
    try:
        yield cache
    finally:
        _ACTIVE.remove(cache)


def digests(x: Tensor) -> list[bytes]:
    """One 16-byte BLAKE2b digest of the exact bytes, dtype and shape of every sample of ``x`` ``(B, ...)``."""
    flat = x.detach().to("cpu").contiguous()
    tag = f"{flat.dtype}{tuple(flat.shape[1:])}".encode()
    return [hashlib.blake2b(row.numpy().tobytes() if row.dtype != torch.bfloat16 else row.view(torch.int16)
                            .numpy().tobytes(), digest_size=16, key=tag[:64]).digest() for row in flat]


def borrowed(module: nn.Module) -> list[nn.Module]:
    """``module`` and the modules it holds by reference, not as children (a shared expert's owner)."""
    refs = [v for k, v in vars(module).items() if isinstance(v, nn.Module) and k not in module._modules]
    return [module, *refs]


def fingerprint(module: nn.Module) -> str:
    """A hash of the whole state (names, shapes, dtypes, values) of ``module`` and what it borrows."""
    h = hashlib.blake2b(digest_size=16)
    for part in borrowed(module):
        for name, t in part.state_dict().items():
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def is_fixed(modules: list[nn.Module], skip: set[int] = frozenset()) -> bool:
    """No trainable parameter and no train-mode randomness or statistics (dropout, drop path,
    BatchNorm) in ``modules`` and their sub-modules, leaving out the modules whose ids are in ``skip``
    and everything inside them."""
    inside = {id(m) for s in modules for m in s.modules() if id(m) in skip}
    inside |= {id(c) for s in modules for m in s.modules() if id(m) in skip for c in m.modules()}
    for top in modules:
        for m in top.modules():
            if id(m) in inside:
                continue
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                return False
            if m.training and ((isinstance(m, nn.Dropout) and m.p > 0) or isinstance(m, nn.modules.batchnorm._BatchNorm)
                               or float(getattr(m, "drop_prob", 0.0) or 0.0) > 0):  # timm DropPath
                return False
    return True
