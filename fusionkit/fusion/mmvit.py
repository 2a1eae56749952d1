"""``mmvit``: MM-ViT's factorised space-time-modality attention (the MM-ViT paper §3.3, variants I–IV).

Every modality is a stream (an expert, :mod:`fusionkit.experts.mmvit_stream`) on one shared
``(T, H, W)`` patch grid; the streams usually share one transformer (``mmvit_vit`` owns it,
``mmvit_stream`` borrows it). The operator replaces the attention step of the layer for all joined
streams (site ``replace_attn``); the graph then runs the layer's MLP on every stream. A token is
``z^s_(p,t)``: stream ``s``, patch ``p``, frame ``t``; the CLS (an extra token of the owner) is one
per clip.

========  ==========================================================================================
variant   attention steps of one layer (``LN`` before each, a residual after each)
========  ==========================================================================================
I         joint: every token attends to all tokens of all streams (``global``), the layer's
          own attention (eq. 5-8); no new parameters
II        ``T``: at its location p, across time *and all streams* (new weights), then
          ``S``: in its frame t, across space *and all streams* (the layer's weights) (eq. 9-11)
III       ``T``: time within its stream (new), ``M``: cross-modal at its (p, t) (new), ``S``: space
          within its stream (the layer's weights), in ``order`` (default ``TMS``, eq. 12-15)
IV        III in local windows (``F = T/2`` frames, ``M = N/4`` patches as ``H/2 × W/2``) and "a
          convolution layer after the temporal and spatial attention" (kernel = window, stride 1):
          by default one depthwise spatial convolution after the spatial attention (``convs``)
========  ==========================================================================================

Cross-modal step (III / IV, ``cross``):

* ``merged`` (eq. 16, ``s' ∈ S``): the query of stream s at (p, t) attends to the keys / values of
  all streams at (p, t), its own included (one window of ``|S|`` tokens per (p, t));
* ``co`` (``s' ∈ S \\ {s}``): the same windows with the query's own stream masked out;
* ``shift`` (eq. 17-20): no queries or keys: ``v = W_V LN(y)``, split into ``|S|`` channel chunks;
  stream k gets ``concat_s v_s[chunk k] + v_k``, then the output projection.

New attention (``time`` / ``modal``) holds ``norm`` (LN), ``attn`` (``W_Q, W_K, W_V`` fused, output
projection) and ``fc`` (TimeSformer's temporal FC, zero at init so that the pretrained ViT is
unchanged at init): ``5·(d² + d) + 2d`` parameters per layer; ``shift`` keeps ``W_V``, the output
projection and ``fc`` (``3·(d² + d) + 2d``). Both replace nothing: the layer's own ``norm1`` / ``attn``
/ ``ls1`` / ``drop_path1`` serve the joint (I) and spatial (II–IV) steps. The IV convolutions are
zero-initialised residual branches over the patch grid, one weight per channel with a bias, shared
by all streams: ``conv_space`` ``(D, 1, rows, cols)`` after the spatial attention and, with
``convs: [time, space]``, ``conv_time`` ``(D, 1, F)`` after the temporal one. The paper's count
decides the default: Table 1 gives IV 0.46M more than III, and one depthwise 7×7 convolution with
bias per layer is ``12 · 768 · (49 + 1) = 460,800`` exactly (both convolutions: 506,880).

Extra tokens (the clip's CLS) in the spatial step (and I's joint step) are replicated into every
frame's (local) window of their stream and their outputs averaged: TimeSformer's divided attention.
In the temporal step TimeSformer leaves the CLS out (it neither attends nor is attended, its update
is zero): ``time_extras: false``, what the paper recipes (``recipes/mmvit_*.yaml``) set. The
operator's default, ``time_extras: true``, replicates it into every temporal window of its stream
(II: every cross-stream temporal window) and averages, fusionkit's earlier reading, kept as the
default so that recipes measured with it keep their behaviour. The CLS has no (p, t) and is left out
of the cross-modal step (its update there is zero). All attention goes through
:func:`fusionkit.attention.windowed`: built-in windows on each stream, and :class:`StreamWindow`
(sequences built from a built-in window over every stream) for the steps across streams.

Options: ``variant`` (``I`` … ``IV``, default ``III``), ``cross`` (III / IV, default ``merged``),
``order`` (``TS`` / ``ST`` for II, any permutation of ``TMS`` for III / IV, Table 2), ``heads``
(default ``D / 64``), ``time_extras`` (II–IV, default ``true``), ``window_frames`` / ``window_size``
(IV, default ``T/2`` and ``[H/2, W/2]``), ``convs`` (IV, default ``[space]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath
from torch import Tensor, nn

import fusionkit.experts.mmvit_stream  # noqa: F401  (registers mmvit_vit / mmvit_stream)
from fusionkit.attention import Attention, Global, Local, Space, Time, TokenLayout, Window, windowed
from fusionkit.experts.block import Block
from fusionkit.fusion.base import FusionOp, SiteState
from fusionkit.registry import FUSIONS

VARIANTS = ("I", "II", "III", "IV")
CROSS = ("merged", "co", "shift")
CONV_AXES = ("time", "space")
ROMAN = {"1": "I", "2": "II", "3": "III", "4": "IV"}
DEFAULT_ORDER = {"I": "J", "II": "TS", "III": "TMS", "IV": "TMS"}
POINT = Local(1, 1, 1)  # one patch at one (p, t): the cross-modal windows pair these across streams


def flat_layout(layouts: Sequence[TokenLayout]) -> TokenLayout:
    """Layout of the concatenation of several streams' tokens (``(B, ΣL_s, D)``), as one flat run."""
    return TokenLayout(1, 1, sum(lay.length for lay in layouts))


@dataclass(frozen=True)
class StreamWindow(Window):
    """Sequences over the concatenated tokens of several streams: the g-th sequences of ``base`` (a
    built-in window) over every stream's own layout, joined (all streams must give the same number).

    MM-ViT I (``global``), II (``time`` / ``space``: across time or space *and* streams) and the
    cross-modal step (one patch per (p, t) and stream: ``|S|`` tokens per window). ``extras`` says
    whether the streams' extra tokens take part (the window decides it itself: the flat layout of a
    concatenation has no extras of its own).
    """

    base: Window
    layouts: tuple[TokenLayout, ...]
    extras: bool = True
    name = "streams"

    def per_stream(self) -> list[list[Tensor]]:
        """Each stream's sequences as positions into the concatenation."""
        out, offset = [], 0
        for lay in self.layouts:
            plan = self.base.plan(lay, self.extras)
            out.append([s + offset for s in plan.index.split(list(plan.seqlens))])
            offset += lay.length
        return out

    def aligned(self) -> bool:
        return len({len(seqs) for seqs in self.per_stream()}) == 1

    def sequences(self, layout: TokenLayout, extras: bool) -> list[Tensor]:
        total = sum(lay.length for lay in self.layouts)
        if layout.length != total:
            raise ValueError(f"stream window over {len(self.layouts)} streams of {total} tokens applied to {layout}")
        seqs = self.per_stream()
        if not self.aligned():
            raise ValueError(f"window {self.base.name!r} gives {[len(s) for s in seqs]} sequences over the streams "
                             f"{list(self.layouts)}: they cannot be paired")
        return [torch.cat([stream[g] for stream in seqs]) for g in range(len(seqs[0]))]


class FactorAttention(nn.Module):
    """An added factorised attention: ``fc(MHA(x, kv))`` with its own pre-norm ``norm``.

    ``forward(x (B', S, D), kv=None, bias=None) -> (B', S, D)``; ``fc`` is zero at init.
    """

    def __init__(self, dim: int, heads: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, qkv_bias=True)
        self.fc = nn.Linear(dim, dim)
        for m in (self.attn.qkv, self.attn.proj):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor, kv: Tensor | None = None, bias=None) -> Tensor:  # noqa: ANN001
        return self.fc(self.attn(x, kv=kv, bias=bias))


class ShiftMerge(nn.Module):
    """Shift-Merge (eq. 17-20): value chunks exchanged between streams at the same (p, t).

    ``forward(x (S, B, T, N, D)) -> (S, B, T, N, D)`` on normalised patches of the S streams:
    ``v = W_V x``; ``r_k = concat_s v_s[..., chunk k] + v_k``; ``fc(proj(r_k))`` (``fc`` zero at init).
    """

    def __init__(self, dim: int, streams: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if dim % streams:
            raise ValueError(f"shift-merge splits the width {dim} into {streams} equal chunks (one per stream): "
                             "not divisible")
        self.streams = streams
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, dim)
        for m in (self.v, self.proj):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        v = self.v(x)
        r = rearrange(v, "s ... (k c) -> k ... (s c)", k=self.streams) + v
        return self.fc(self.proj(r))


def _norm_order(order: str | None, variant: str) -> str:
    if order is None:
        return DEFAULT_ORDER[variant]
    letters = "".join(ch for ch in str(order).upper() if ch.isalpha())
    expected = DEFAULT_ORDER[variant]
    if variant == "I":
        if letters not in ("", "J"):
            raise ValueError(f"mmvit variant I has one joint attention step: order does not apply (got {order!r})")
        return "J"
    if sorted(letters) != sorted(expected):
        raise ValueError(f"mmvit variant {variant}: order must be a permutation of {expected!r} "
                         f"(T time, M cross-modal, S space), got {order!r}")
    return letters


@FUSIONS.register("mmvit")
class MMViT(FusionOp):
    """MM-ViT I–IV: joint / factorised space-time-modality attention over streams (the MM-ViT paper, eq. 5-20).

    Args:
        experts: the joined streams (one per modality, equal width, one ``(T, H, W)`` grid); the first
            one's stream order is the chunk order of shift-merge.
        dims, layouts, drop_path: given by the graph.
        variant: ``I``, ``II``, ``III`` (default) or ``IV`` (also ``1``–``4``).
        cross: cross-modal attention of III / IV: ``merged`` (default), ``co`` or ``shift``.
        order: attention order: ``TS`` / ``ST`` (II) or a permutation of ``TMS`` (III / IV, default
            ``TMS``); ``T⇒M⇒S`` style is accepted.
        heads: heads of the added attentions (default ``D / 64``, at least 1).
        time_extras: II–IV: whether the extras (the clip's CLS) take part in the temporal step
            (default ``True``, replicated into every temporal window; ``False``: left out, as in
            TimeSformer).
        window_frames: IV's temporal window ``F`` (default ``T / 2``).
        window_size: IV's spatial window ``[rows, cols]`` (default ``[H / 2, W / 2]``: ``M = N / 4``).
        convs: IV's depthwise convolutions, by the attention they follow: ``[space]`` (default, the
            paper's 0.46M) or ``[time, space]``, or ``[]``.
        norm_eps: epsilon of the added LayerNorms.
    """

    site = "replace_attn"

    def __init__(self, *, experts: list[str], dims: Mapping[str, int], layouts: Mapping[str, TokenLayout],
                 drop_path: float = 0.0, variant: str | int = "III",
                 cross: str | None = None, order: str | None = None, heads: int | None = None,
                 time_extras: bool | None = None, window_frames: int | None = None,
                 window_size: Sequence[int] | None = None, convs: Sequence[str] | None = None,
                 norm_eps: float = 1e-6) -> None:
        super().__init__(experts=experts)
        variant = ROMAN.get(str(variant), str(variant).upper())
        if variant not in VARIANTS:
            raise ValueError(f"mmvit: unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
        if cross is not None and variant in ("I", "II"):
            raise ValueError(f"mmvit: cross={cross!r} applies to variants III and IV only (got variant {variant})")
        cross = cross or "merged"
        if cross not in CROSS:
            raise ValueError(f"mmvit: unknown cross {cross!r}; valid: {', '.join(CROSS)}")
        if variant != "IV" and (window_frames is not None or window_size is not None or convs is not None):
            raise ValueError(f"mmvit: window_frames / window_size / convs apply to variant IV only (got variant "
                             f"{variant})")
        if variant == "I" and time_extras is not None:
            raise ValueError("mmvit: time_extras applies to the temporal step of variants II-IV (got variant I)")
        convs = tuple(["space"] if convs is None else [convs] if isinstance(convs, str) else convs)
        if any(a not in CONV_AXES for a in convs) or len(set(convs)) != len(convs):
            raise ValueError(f"mmvit: convs must list distinct axes of {', '.join(CONV_AXES)}, got {list(convs)}")
        widths = {dims[e] for e in experts}
        if len(widths) != 1:
            raise ValueError(f"mmvit attends across streams with shared weights, so they need one width; got "
                             f"{dict(dims)}")
        grids = {(layouts[e].t, layouts[e].h, layouts[e].w) for e in experts}
        if len(grids) != 1:
            raise ValueError("mmvit pairs the streams' tokens at the same (p, t): they need one (T, H, W) grid; got "
                             + ", ".join(f"{e}: {layouts[e]}" for e in experts))
        if cross in ("co", "shift") and variant in ("III", "IV") and len(experts) < 2:
            raise ValueError(f"mmvit cross={cross!r} exchanges between streams: join at least two, got {experts}")
        (dim,) = widths
        heads = heads or max(1, dim // 64)
        if dim % heads:
            raise ValueError(f"mmvit: width {dim} is not divisible by heads={heads}")
        self.variant, self.cross, self.order = variant, cross, _norm_order(order, variant)
        self.dim, self.heads = dim, heads
        self.time_extras = True if time_extras is None else bool(time_extras)
        t, h, w = next(iter(grids))
        if variant == "IV":
            self.frames = int(window_frames or max(1, t // 2))
            rows, cols = window_size or (max(1, h // 2), max(1, w // 2))
            self.rows, self.cols = int(rows), int(cols)
            self.time_window: Window = Local(self.frames, 1, 1)
            self.space_window: Window = Local(1, self.rows, self.cols)
            if "time" in convs:
                self.conv_time = nn.Conv1d(dim, dim, self.frames, groups=dim)
            if "space" in convs:
                self.conv_space = nn.Conv2d(dim, dim, (self.rows, self.cols), groups=dim)
            for axis in convs:
                nn.init.zeros_(getattr(self, f"conv_{axis}").weight)
                nn.init.zeros_(getattr(self, f"conv_{axis}").bias)
        else:
            self.time_window, self.space_window = Time(), Space()
        self.convs = convs if variant == "IV" else ()
        if variant != "I":
            self.time = FactorAttention(dim, heads, norm_eps)
        if variant in ("III", "IV"):
            self.modal = ShiftMerge(dim, len(experts), norm_eps) if cross == "shift" else \
                FactorAttention(dim, heads, norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    # helpers -------------------------------------------------------------------------------------

    def _layouts(self, layouts: Mapping[str, TokenLayout]) -> tuple[TokenLayout, ...]:
        return tuple(layouts[e] for e in self.experts)

    def _across(self, fn, h: Mapping[str, Tensor], layouts: Mapping[str, TokenLayout], base: Window,  # noqa: ANN001
                extras: bool = True) -> dict[str, Tensor]:
        """``fn`` over windows joining the g-th ``base`` sequence of every stream (see StreamWindow)."""
        lays = self._layouts(layouts)
        window = StreamWindow(base, lays, extras)
        if extras and not window.aligned():  # e.g. per-frame CLS beside a stream without: patches only
            window = StreamWindow(base, lays, False)
        y = windowed(fn, torch.cat([h[e] for e in self.experts], dim=1), flat_layout(lays), window)
        return dict(zip(self.experts, y.split([lay.length for lay in lays], dim=1)))

    def _within(self, fns: Mapping[str, nn.Module], h: Mapping[str, Tensor], layouts: Mapping[str, TokenLayout],
                window: Window, extras: bool = True) -> dict[str, Tensor]:
        """``fns[e]`` over ``window`` within every stream; streams with one module and one layout run batched.
        ``extras=False`` leaves the extras out (their output is zero)."""
        groups: dict[tuple[int, TokenLayout], list[str]] = {}
        for e in self.experts:
            groups.setdefault((id(fns[e]), layouts[e]), []).append(e)
        out = {}
        for (_, layout), names in groups.items():
            y = windowed(fns[names[0]], torch.cat([h[e] for e in names]), layout, window, query_extras=extras,
                         key_extras=extras)
            out.update(zip(names, y.split([h[e].shape[0] for e in names])))  # chunk(1) would fix a dynamic batch
        return out

    def _shared_layer(self, layers: Mapping[str, nn.Module]) -> nn.Module:
        layer = layers[self.experts[0]]
        if any(layers[e] is not layer for e in self.experts):
            raise ValueError(f"mmvit variant {self.variant} attends across streams with one layer's attention: the "
                             f"joined experts {list(self.experts)} must share their layers (mmvit_stream experts)")
        return layer

    def _conv(self, x: dict[str, Tensor], layouts: Mapping[str, TokenLayout], axis: str) -> dict[str, Tensor]:
        """IV: ``x + conv(x)`` over the patch grid of every stream (depthwise, kernel = window, stride 1);
        ``x`` unchanged when ``convs`` has no convolution on ``axis``."""
        if axis not in self.convs:
            return x
        out = {}
        for e in self.experts:
            lay = layouts[e]
            extras, patches = lay.split(x[e])
            if axis == "time":
                g = rearrange(patches, "b t n d -> (b n) d t")
                k = self.frames
                y = self.conv_time(F.pad(g, ((k - 1) // 2, k - 1 - (k - 1) // 2)))
                y = rearrange(y, "(b n) d t -> b t n d", b=patches.shape[0])
            else:
                g = rearrange(patches, "b t (h w) d -> (b t) d h w", h=lay.h)
                r, c = self.rows, self.cols
                g = F.pad(g, ((c - 1) // 2, c - 1 - (c - 1) // 2, (r - 1) // 2, r - 1 - (r - 1) // 2))
                y = rearrange(self.conv_space(g), "(b t) d h w -> b t (h w) d", b=patches.shape[0])
            out[e] = lay.join(extras, patches + self.drop_path(y))
        return out

    # steps ---------------------------------------------------------------------------------------

    def joint(self, x: dict[str, Tensor], layouts: Mapping[str, TokenLayout],
              layers: Mapping[str, nn.Module]) -> dict[str, Tensor]:
        """I: every token attends to all tokens of all streams with the layer's attention."""
        layer = self._shared_layer(layers)
        out = self._across(layer.attn, {e: layer.norm1(x[e]) for e in self.experts}, layouts, Global())
        return {e: layer.attention_residual(x[e], out[e]) for e in self.experts}

    def temporal(self, x: dict[str, Tensor], layouts: Mapping[str, TokenLayout],
                 layers: Mapping[str, nn.Module]) -> dict[str, Tensor]:
        """``T``: new attention over time, across all streams (II) or within each stream (III / IV)."""
        h = {e: self.time.norm(x[e]) for e in self.experts}
        if self.variant == "II":
            out = self._across(self.time, h, layouts, self.time_window, self.time_extras)
        else:
            out = self._within({e: self.time for e in self.experts}, h, layouts, self.time_window, self.time_extras)
        x = {e: x[e] + self.drop_path(out[e]) for e in self.experts}
        return self._conv(x, layouts, "time")

    def spatial(self, x: dict[str, Tensor], layouts: Mapping[str, TokenLayout],
                layers: Mapping[str, nn.Module]) -> dict[str, Tensor]:
        """``S``: the layer's own attention over space, across all streams (II) or within each (III / IV)."""
        if self.variant == "II":
            layer = self._shared_layer(layers)
            out = self._across(layer.attn, {e: layer.norm1(x[e]) for e in self.experts}, layouts, self.space_window)
        else:
            out = self._within({e: layers[e].attn for e in self.experts},
                               {e: layers[e].norm1(x[e]) for e in self.experts}, layouts, self.space_window)
        x = {e: layers[e].attention_residual(x[e], out[e]) for e in self.experts}
        return self._conv(x, layouts, "space")

    def cross_modal(self, x: dict[str, Tensor], layouts: Mapping[str, TokenLayout],
                    layers: Mapping[str, nn.Module]) -> dict[str, Tensor]:
        """``M``: at every (p, t), between the streams (merged / co / shift); extras unchanged."""
        h = {e: self.modal.norm(x[e]) for e in self.experts}
        if self.cross == "shift":
            parts = [layouts[e].split(h[e]) for e in self.experts]
            y = self.modal(torch.stack([p for _, p in parts]))
            out = {e: layouts[e].join(torch.zeros_like(ex), ye) for e, (ex, _), ye in zip(self.experts, parts, y)}
        elif self.cross == "merged":
            out = self._across(self.modal, h, layouts, POINT, extras=False)
        else:  # co: the same windows of |S| tokens, each query masked from its own stream's token
            others = ~torch.eye(len(self.experts), dtype=torch.bool, device=h[self.experts[0]].device)

            def co(z: Tensor, kv: Tensor | None = None, bias=None) -> Tensor:  # noqa: ANN001
                return self.modal(z, bias=others)

            out = self._across(co, h, layouts, POINT, extras=False)
        return {e: x[e] + self.drop_path(out[e]) for e in self.experts}

    def forward(self, state: SiteState) -> dict[str, Tensor]:
        """New tokens ``(B, L_s, D)`` of every joined stream after the attention steps in ``order``."""
        missing = [e for e in self.experts if e not in state.layers]
        if missing:
            raise ValueError(f"mmvit at step {state.step}: expert(s) {missing} have no layer at this step")
        other = {e: type(state.layers[e]).__name__ for e in self.experts if not isinstance(state.layers[e], Block)}
        if other:
            raise ValueError(f"mmvit at step {state.step}: the layers of {other} are not transformer Blocks "
                             "(norm1 / attn): MM-ViT re-runs the frozen attention")
        x = {e: state.x[e] for e in self.experts}
        steps = {"J": self.joint, "T": self.temporal, "M": self.cross_modal, "S": self.spatial}
        for s in self.order:
            x = steps[s](x, state.layouts, state.layers)
        return x

    def extra_repr(self) -> str:
        out = f"variant={self.variant}, order={self.order}"
        if self.variant != "I":
            out += f", time_extras={self.time_extras}"
        if self.variant in ("III", "IV"):
            out += f", cross={self.cross}"
        if self.variant == "IV":
            out += f", window=(frames={self.frames}, rows={self.rows}, cols={self.cols}), convs={list(self.convs)}"
        return out


__all__ = ["CROSS", "VARIANTS", "FactorAttention", "MMViT", "ShiftMerge", "StreamWindow", "flat_layout"]
