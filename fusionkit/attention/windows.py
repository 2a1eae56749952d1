"""Windows: which tokens attend to which, as groupings of a :class:`TokenLayout`.

A window turns the ``(B, L, D)`` tokens of a layout into independent sequences and back:

==========  ==========================================================================
global      the whole clip is one sequence
space       one sequence per frame (a frame's own extras join it)
time        one sequence per spatial location across frames; per-frame extras form their
            own locations (the CLS of every frame attend to each other)
local       blocks of ``(frames, rows, cols)`` patches (MM-ViT IV: M patches × F frames);
            edge blocks may be smaller, which makes the window ragged
ragged      an explicit partition of the stored sequence into consecutive runs of tokens
==========  ==========================================================================

Extras that a window cannot place in a single sequence (extras per clip in space/time/local
windows, per-frame extras in a local window narrower than the frame) are replicated into each
sequence that may see them and their outputs are averaged (as TimeSformer's spatial step treats
its CLS).
``extras=False`` leaves them out entirely: they neither attend nor are attended, and their output
is zero (cross-attention between experts whose extras have no partner, e.g. CLIP's CLS).

When all sequences have the same length they are batched (``(B·G, S, D)``); otherwise they are
packed into one ``(B, ΣS, D)`` sequence with a :class:`~fusionkit.attention.kernels.BlockDiagonal`
bias (an xformers block-diagonal mask on CUDA, a materialised mask elsewhere).

Cross-attention pairs a query layout with a different key layout (``plan_pair``): both sides must
produce the same number of sequences, e.g. a ``time`` window between CLIP frames with CLS and
VideoMAE tubelets without needs the same T and H·W on both sides.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor

from fusionkit.attention.kernels import BlockDiagonal, attention_label, is_recording
from fusionkit.attention.layout import TokenLayout
from fusionkit.registry import WINDOWS


@dataclass(frozen=True)
class WindowPlan:
    """Sequences of token positions for one layout: ``index`` holds them back to back.

    Attributes:
        index: ``(ΣS,)`` positions into the stored sequence (a token may appear several times).
        seqlens: length of each sequence.
        length: ``L`` of the layout.
    """

    index: Tensor
    seqlens: tuple[int, ...]
    length: int

    @property
    def uniform(self) -> bool:
        return len(set(self.seqlens)) == 1

    @functools.cached_property
    def identity(self) -> bool:
        """Sequences are consecutive runs covering every token once: grouping is a reshape."""
        return self.index.numel() == self.length and bool((self.index == torch.arange(self.length)).all())

    @functools.cached_property
    def counts(self) -> Tensor:
        """``(L,)`` number of sequences each token belongs to (0 for left-out tokens)."""
        return torch.bincount(self.index, minlength=self.length)

    @functools.cached_property
    def inverse(self) -> Tensor | None:
        """Position of each token in ``index`` when every token appears exactly once."""
        if self.index.numel() != self.length or not bool((self.counts == 1).all()):
            return None
        return torch.argsort(self.index)

    def group(self, x: Tensor, packed: bool = False) -> Tensor:
        """``(B, L, D)`` to ``(B·G, S, D)``, or ``(B, ΣS, D)`` when packed or ragged."""
        if x.shape[1] != self.length:
            raise ValueError(f"window plan expects {self.length} tokens, got tensor of shape {tuple(x.shape)}")
        g = x if self.identity else x[:, self.index.to(x.device)]
        if packed or not self.uniform:
            return g
        return rearrange(g, "b (g s) d -> (b g) s d", s=self.seqlens[0])

    def ungroup(self, y: Tensor, batch: int) -> Tensor:
        """Inverse of :meth:`group`; replicated tokens are averaged, left-out tokens are zero."""
        y = y.reshape(batch, -1, y.shape[-1])
        if self.identity:
            return y
        if self.inverse is not None:
            return y[:, self.inverse.to(y.device)]
        out = y.new_zeros(batch, self.length, y.shape[-1])
        out.index_add_(1, self.index.to(y.device), y)
        counts = self.counts.to(y.device, y.dtype).clamp(min=1)
        return out / counts[:, None]


class Window:
    """Base class: subclasses turn a layout into the sequences of :class:`WindowPlan`."""

    name = "window"

    def sequences(self, layout: TokenLayout, extras: bool) -> list[Tensor]:
        raise NotImplementedError

    def plan(self, layout: TokenLayout, extras: bool = True) -> WindowPlan:
        """The (cached) plan of this window over ``layout``; ``extras=False`` leaves extras out."""
        return _plan(self, layout, extras)


@functools.lru_cache(maxsize=256)
def _plan(window: Window, layout: TokenLayout, extras: bool) -> WindowPlan:
    seqs = window.sequences(layout, extras and layout.extras > 0)
    return WindowPlan(torch.cat(seqs), tuple(int(s.numel()) for s in seqs), layout.length)


def _rows(t: Tensor) -> list[Tensor]:
    return list(t.reshape(t.shape[0], -1))


@WINDOWS.register("local")
@dataclass(frozen=True)
class Local(Window):
    """Blocks of ``frames × rows × cols`` patches (``None`` = the full extent).

    A frame's extras join every block covering that frame (replicated, outputs averaged);
    extras per clip join every block. Extents that do not divide the grid give smaller edge
    blocks (a ragged window).
    """

    frames: int | None = None
    rows: int | None = None
    cols: int | None = None
    name = "local"

    def sequences(self, layout: TokenLayout, extras: bool) -> list[Tensor]:
        ft, fh, fw = (min(v or full, full) for v, full in ((self.frames, layout.t), (self.rows, layout.h),
                                                           (self.cols, layout.w)))
        patches, extra = layout.patch_index(), layout.extra_index()
        seqs = []
        for t0 in range(0, layout.t, ft):
            if extras:
                ex = extra[t0:t0 + ft].reshape(-1) if layout.per_frame_extras else extra.reshape(-1)
            for h0 in range(0, layout.h, fh):
                for w0 in range(0, layout.w, fw):
                    block = patches[t0:t0 + ft, h0:h0 + fh, w0:w0 + fw].reshape(-1)
                    seqs.append(torch.cat([ex, block]) if extras else block)
        return seqs


@WINDOWS.register("global")
@dataclass(frozen=True)
class Global(Window):
    """The whole clip (all frames, all extras) is one sequence: joint space-time attention."""

    name = "global"

    def sequences(self, layout: TokenLayout, extras: bool) -> list[Tensor]:
        if extras:
            return [torch.arange(layout.length)]
        return [layout.patch_index().reshape(-1)]


@WINDOWS.register("space")
@dataclass(frozen=True)
class Space(Window):
    """One sequence per frame: the frame's patches and its extras (per-clip extras replicated)."""

    name = "space"

    def sequences(self, layout: TokenLayout, extras: bool) -> list[Tensor]:
        patches = rearrange(layout.patch_index(), "t h w -> t (h w)")
        if extras:
            ex = layout.extra_index()
            ex = ex if layout.per_frame_extras else repeat(ex[0], "e -> t e", t=layout.t)
            patches = torch.cat([ex, patches], dim=1)
        return _rows(patches)


@WINDOWS.register("time")
@dataclass(frozen=True)
class Time(Window):
    """One sequence per spatial location across frames.

    Per-frame extras form ``E`` more locations (the CLS of all frames attend to each other);
    extras per clip join every location's sequence (replicated, outputs averaged).
    """

    name = "time"

    def sequences(self, layout: TokenLayout, extras: bool) -> list[Tensor]:
        seqs = rearrange(layout.patch_index(), "t h w -> (h w) t")
        if extras and layout.per_frame_extras:
            seqs = torch.cat([rearrange(layout.extra_index(), "t e -> e t"), seqs], dim=0)
        elif extras:
            seqs = torch.cat([repeat(layout.extra_index()[0], "e -> n e", n=layout.n), seqs], dim=1)
        return _rows(seqs)


@WINDOWS.register("ragged")
@dataclass(frozen=True)
class Ragged(Window):
    """An explicit partition of the stored token sequence into consecutive runs of ``lengths``."""

    lengths: tuple[int, ...] = ()
    name = "ragged"

    def sequences(self, layout: TokenLayout, extras: bool) -> list[Tensor]:
        if sum(self.lengths) != layout.length:
            raise ValueError(f"ragged window lengths {self.lengths} sum to {sum(self.lengths)}, "
                             f"but {layout} stores {layout.length} tokens")
        runs = torch.arange(layout.length).split(list(self.lengths))
        if extras or layout.extras == 0:
            return list(runs)
        is_patch = torch.zeros(layout.length, dtype=torch.bool)
        is_patch[layout.patch_index().reshape(-1)] = True
        return [kept for run in runs if (kept := run[is_patch[run]]).numel()]


# aliases, registered beside the windows they name (``fusionkit list`` shows them): the whole clip
# (B-CA's ``space-time``, AV-STFP's ``clip``) and one frame (AV-STFP's ``frame``)
for _alias, _cls in {"space-time": Global, "spacetime": Global, "clip": Global, "frame": Space}.items():
    WINDOWS.register(_alias, description=f"alias of {_cls.__name__.lower()}")(_cls)


def make_window(spec: str | Window) -> Window:
    """A window from its registry name (``"time"``, or an alias such as ``"space-time"``) or an instance
    (returned as is)."""
    if isinstance(spec, Window):
        return spec
    return WINDOWS.get(spec)()


AttnFn = Callable[..., Tensor]


def windowed(fn: AttnFn, x: Tensor, layout: TokenLayout, window: str | Window, *, kv: Tensor | None = None,
             kv_layout: TokenLayout | None = None, kv_window: str | Window | None = None,
             query_extras: bool = True, key_extras: bool = True) -> Tensor:
    """Run ``fn(xq, kv=xk, bias=...)`` on every window independently and restore the layout.

    Args:
        fn: attention taking ``(B', S, D)`` queries, optional ``kv=(B', S', D')`` and ``bias=``.
        x: query tokens ``(B, L, D)`` laid out as ``layout``.
        window: window (or name) over the query layout.
        kv: key/value tokens ``(B, L', D')`` laid out as ``kv_layout`` (cross-attention); ``None``
            for self-attention.
        kv_window: window over the key layout (default: the same as ``window``).
        query_extras / key_extras: whether extra tokens take part on each side.

    Returns:
        ``(B, L, D_out)``: each token's attention output (zero for left-out query tokens).
    """
    layout.check(x, "query tokens")
    window = make_window(window)
    qp = window.plan(layout, query_extras)
    if kv is None:
        if key_extras != query_extras:
            raise ValueError("self-attention leaves extras out of queries and keys together: pass the same "
                             f"query_extras and key_extras (got {query_extras} and {key_extras})")
        packed = not qp.uniform
        with _keys(qp, layout, x.shape[0]):
            y = fn(qp.group(x, packed), kv=None, bias=BlockDiagonal.self_attention(qp.seqlens) if packed else None)
        return qp.ungroup(y, x.shape[0])
    kv_layout = kv_layout or layout
    kv_layout.check(kv, "key/value tokens")
    kp = make_window(kv_window or window).plan(kv_layout, key_extras)
    if len(qp.seqlens) != len(kp.seqlens):
        raise ValueError(f"window {window.name!r} gives {len(qp.seqlens)} query sequences over {layout} but "
                         f"{len(kp.seqlens)} key sequences over {kv_layout}; the layouts are not compatible")
    packed = not (qp.uniform and kp.uniform)
    bias = BlockDiagonal(qp.seqlens, kp.seqlens) if packed else None
    with _keys(kp, kv_layout, kv.shape[0]):
        y = fn(qp.group(x, packed), kv=kp.group(kv, packed), bias=bias)
    return qp.ungroup(y, x.shape[0])


def _keys(plan: WindowPlan, layout: TokenLayout, batch: int) -> contextlib.AbstractContextManager[None]:
    """Under :func:`~fusionkit.attention.recording`, state the key side of the attention calls inside
    (``fusionkit inspect`` maps the weights back to key tokens with it); a no-op otherwise."""
    if not is_recording():
        return contextlib.nullcontext()
    return attention_label(None, key_plan=plan, key_layout=layout, key_batch=batch)
