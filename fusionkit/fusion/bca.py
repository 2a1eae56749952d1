"""``bca``: bottleneck cross-attention between experts (B-CAST of CAST, B-CA of CA²ST).

The CAST paper, eq. 6–7 and the CA²ST paper eq. 8–10. For every expert ``e`` the operator holds one
down-projection ``W_D,e`` (``D_e → d``), a LayerNorm and one zero-initialised up-projection
``W_U,e`` (``d → D_e``); every *direction* (queries of one expert, keys/values of another, a window)
holds one multi-head cross-attention and its position embeddings::

    n_e      = LN_e(W_D,e · Y_e)                                         (B, L_e, d)
    o_{k→q}  = MHCA(n_q + E_q, n_k + E_k) within the direction's window   (B, L_q, d)
    Y_q'     = Y_q + DropPath(W_U,q · Σ_k GELU(o_{k→q}))

* Extra tokens (CLS, distillation) never take part in the cross-attention; as in the official
  CAST code their ``o`` is their own ``n`` (so they still get an adapter-like update).
* Several directions into one expert (CA²ST eq. 10) share that expert's ``W_D``/``W_U``: the
  GELU outputs are summed before the up-projection, so its bias is applied once.
* Windows: ``time`` (T2S: a patch attends to the other expert's tokens at its location over time),
  ``space`` (S2T: within the frame), ``space-time`` / ``global`` (the whole clip).
* Position embeddings: ``learned`` (per direction, one per position within the window, init
  ``head_dim^-0.5 · randn``), ``time`` (a Time-Interval MLP, CAVA) or ``none``.
* ``mode``: ``bottleneck`` (default), ``full`` (cross-attention at full width, no projections,
  output projection zero-initialised: the "w/o adapter" ablation) or ``full_adapter`` (full-width
  cross-attention followed by a zero-initialised adapter: "X-attn → adapter").
* ``share``: ``direction`` (default; eq. 10 read literally, as CAST and CAVA count) gives every
  direction its own cross-attention ``cross.<direction>.attn``; ``pair`` gives each unordered pair of
  experts one cross-attention ``pairs.<a>_<b>`` (``W_Q, W_K, W_V``, output projection) used by both
  its directions, each direction still with its own window and position embeddings (the reading of
  CA²ST's 62M parameters that comes closest, ``recipes/ca2st_shared.yaml``).

At init the operator returns its inputs unchanged (zero up-projection / output projection).
Site: ``post_attn`` (between attention and MLP), as in CAST.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from fusionkit.adapters import Adapter
from fusionkit.attention import Attention, TokenLayout, Window, attention_label, make_window, windowed
from fusionkit.fusion.base import FusionOp, SiteState
from fusionkit.fusion.directions import parse_directions
from fusionkit.fusion.time_embed import TimeIntervalMLP
from fusionkit.registry import FUSIONS

MODES = ("bottleneck", "full", "full_adapter")
SHARES = ("direction", "pair")
POSITIONS = ("learned", "time", "none")
def window_length(window: Window, layout: TokenLayout, what: str) -> int:
    """Length of every patch sequence of ``window`` over ``layout`` (position embeddings need one)."""
    plan = window.plan(layout, extras=False)
    if not plan.uniform:
        raise ValueError(f"{what}: window {window.name!r} over {layout} gives sequences of different lengths; "
                         "learned position embeddings need equal ones (use position=time or none)")
    return plan.seqlens[0]


def _bottleneck_width(ratio: Any, widest: int) -> int:
    """``round(ratio · widest)``, with a message naming ``ratio`` when it is not a positive number."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0 or ratio == float("inf"):
        raise ValueError(f"bca: ratio must be a number > 0 (the bottleneck width as a fraction of the widest joined "
                         f"expert, e.g. 0.5), got {ratio!r}")
    width = int(round(ratio * widest))
    if width < 1:
        raise ValueError(f"bca: ratio {ratio!r} gives a bottleneck of width {width} for experts {widest} wide; "
                         f"use a ratio of at least {0.5 / widest:.3g}")
    return width


class CrossDirection(nn.Module):
    """One direction: multi-head cross-attention with learned per-window-position embeddings.

    ``forward(q (B', S, d), kv (B', S', d), bias, attn=None)`` adds ``pos_q`` ``(S, d)`` / ``pos_kv``
    ``(S', d)``, then attends (query projection and key/value projection with their own biases, as
    in CAST) with its own ``attn``, or with ``attn`` given by the caller when ``own_attention`` is
    ``False`` (a cross-attention shared by the pair's two directions).
    """

    def __init__(self, dim: int, heads: int, q_len: int | None, kv_len: int | None,
                 own_attention: bool = True) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, qkv_bias=True) if own_attention else None
        scale = (dim // heads) ** -0.5
        self.pos_q = nn.Parameter(scale * torch.randn(q_len, dim)) if q_len else None
        self.pos_kv = nn.Parameter(scale * torch.randn(kv_len, dim)) if kv_len else None

    def no_weight_decay(self) -> set[str]:
        """The learned per-window-position embeddings."""
        return {"pos_q", "pos_kv"}

    def forward(self, q: Tensor, kv: Tensor, bias: Any = None, attn: Attention | None = None) -> Tensor:
        if self.pos_q is not None:
            if q.shape[1] != self.pos_q.shape[0] or kv.shape[1] != self.pos_kv.shape[0]:
                raise ValueError(f"B-CA position embeddings were built for windows of {self.pos_q.shape[0]} query / "
                                 f"{self.pos_kv.shape[0]} key tokens, got {q.shape[1]} / {kv.shape[1]}: the input "
                                 "differs from the recipe's inputs (frames or size)")
            q, kv = q + self.pos_q, kv + self.pos_kv
        return (attn or self.attn)(q, kv=kv, bias=bias)


@FUSIONS.register("bca")
class BCA(FusionOp):
    """Bottleneck cross-attention (CAST B-CAST / CA²ST B-CA): windowed MHCA inside a bottleneck adapter.

    Args:
        experts: the joined experts (names), ``dims`` / ``layouts`` at this step (given by the graph).
        directions: ``{name: {query: expert, key: expert, window: time|space|space-time|global,
            position: ...}}`` or ``[key->query, ...]`` (:mod:`fusionkit.fusion.directions`), e.g. CAST's
            ``t2s`` (spatial queries, temporal keys, ``time``) and ``s2t``; ``position`` overrides the
            operator's for one direction (CA²ST: learned for S&T, time for A&S and A&T). Default: both
            directions between every pair, ``global`` windows.
        ratio: bottleneck width ``d`` as a fraction of the widest joined expert (CAST: 1/2), unless
            ``bottleneck_dim`` is given.
        heads: attention heads over the bottleneck (CAST: 12 over 384).
        position: ``learned`` / ``time`` / ``none`` (see the module docstring).
        time_mlp: options of the Time-Interval MLP (``hidden``, ``groups``) for ``position: time``.
        mode: ``bottleneck`` / ``full`` / ``full_adapter``; ``adapter_ratio`` for the latter.
        share: ``direction`` (one cross-attention per direction, default) or ``pair`` (one per
            unordered expert pair, used by both of its directions).
        norm_eps: LayerNorm epsilon (1e-6 in CAST).
        drop_path: stochastic depth of the update (the graph's rate for this step).
    """

    site = "post_attn"
    zero_init = True  # zero up-projection / output projection / adapter
    example = {"heads": 4}

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Reject an option set away from its default that the chosen ``mode`` would silently ignore
        (checked before anything is built; ``cast.yaml``'s ``ratio: 0.5``, the default, stays valid
        under ``mode=full``)."""
        mode = options.get("mode", "bottleneck")
        ignored = {"ratio", "bottleneck_dim"} if mode in ("full", "full_adapter") else set()
        ignored |= {"adapter_ratio"} if mode != "full_adapter" else set()
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        given = sorted(k for k in ignored & set(options) if options[k] != defaults[k])
        if given:
            raise ValueError(f"{given[0]!r} = {options[given[0]]!r} has no effect with mode {mode!r} (the bottleneck "
                             "width is mode bottleneck's, adapter_ratio mode full_adapter's)")

    def __init__(self, *, experts: list[str], dims: Mapping[str, int], layouts: Mapping[str, TokenLayout],
                 directions: Mapping[str, Mapping[str, str] | None] | Sequence[str] | None = None,
                 drop_path: float = 0.0, ratio: float = 0.5, bottleneck_dim: int | None = None, heads: int = 12,
                 position: str = "learned", time_mlp: Mapping[str, Any] | None = None, mode: str = "bottleneck",
                 adapter_ratio: float = 0.25, share: str = "direction", norm_eps: float = 1e-6) -> None:
        super().__init__(experts=experts)
        if mode not in MODES:
            raise ValueError(f"bca: unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if share not in SHARES:
            raise ValueError(f"bca: unknown share {share!r}; valid: {', '.join(SHARES)}")
        if position not in POSITIONS:
            raise ValueError(f"bca: unknown position {position!r}; valid: {', '.join(POSITIONS)}")
        self.mode = mode
        self.directions: dict[str, tuple[str, str, Window]] = {}
        self.positions: dict[str, str] = {}
        for name, d in parse_directions("bca", experts, directions, options=("position",)).items():
            self.positions[name] = d.options.get("position", position)
            if self.positions[name] not in POSITIONS:
                raise ValueError(f"bca direction {name!r}: unknown position {self.positions[name]!r}; valid: "
                                 f"{', '.join(POSITIONS)}")
            self.directions[name] = (d.query, d.key, make_window(d.window))
        if mode == "bottleneck":
            width = bottleneck_dim or _bottleneck_width(ratio, max(dims.values()))
        else:
            if len(set(dims.values())) != 1:
                raise ValueError(f"bca mode {mode!r} attends at full width and needs experts of one width, got {dims}")
            width = next(iter(dims.values()))
        if width % heads:
            raise ValueError(f"bca: width {width} is not divisible by heads={heads}")
        self.width = width
        used = sorted({e for q, k, _ in self.directions.values() for e in (q, k)})
        bottleneck = mode == "bottleneck"
        self.down = nn.ModuleDict({e: nn.Linear(dims[e], width) if bottleneck else nn.Identity() for e in used})
        self.norm = nn.ModuleDict({e: nn.LayerNorm(width, eps=norm_eps) for e in used})
        self.share = share
        self.pairs = nn.ModuleDict({pair_key(q, k): Attention(width, heads, qkv_bias=True)
                                    for q, k, _ in self.directions.values()}) if share == "pair" else None
        self.cross = nn.ModuleDict()
        for name, (q, k, window) in self.directions.items():
            lengths = (window_length(window, layouts[q], f"bca {name}"), window_length(window, layouts[k], f"bca {name}")) \
                if self.positions[name] == "learned" else (None, None)
            self.cross[name] = CrossDirection(width, heads, *lengths, own_attention=share == "direction")
        groups = max(layout.t for layout in layouts.values())  # audio time groups follow the video frames
        self.time_embed = TimeIntervalMLP(width, **{"groups": groups, **dict(time_mlp or {})}) \
            if "time" in self.positions.values() else None
        receivers = sorted({q for q, _, _ in self.directions.values()})
        self.up = nn.ModuleDict({e: nn.Linear(width, dims[e]) for e in receivers}) if bottleneck else None
        self.adapter = nn.ModuleDict({e: Adapter(width, adapter_ratio) for e in receivers}) \
            if mode == "full_adapter" else None
        self.act = nn.GELU()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear) and not any(m is a.D_fc1 or m is a.D_fc2 for a in (self.adapter or {}).values()):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        zero = list(self.up.values()) if self.up is not None else \
            [] if self.adapter is not None else [a.proj for a in self.attentions()]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def attentions(self) -> list[Attention]:
        """The operator's cross-attentions: one per direction, or one per pair (``share: pair``)."""
        if self.pairs is not None:
            return list(self.pairs.values())
        return [c.attn for c in self.cross.values()]

    def attention_of(self, name: str) -> Attention:
        """The cross-attention that direction ``name`` runs (its own, or its pair's)."""
        if self.pairs is None:
            return self.cross[name].attn
        q, k, _ = self.directions[name]
        return self.pairs[pair_key(q, k)]

    def forward(self, state: SiteState) -> dict[str, Tensor]:
        """Update the receiving experts' tokens ``(B, L_e, D_e)``; see the module docstring."""
        n = {e: self.norm[e](self.down[e](state.x[e])) for e in self.norm}
        timed: dict[str, Tensor] = {}  # n + time embedding, computed once per expert

        def inputs(e: str, position: str) -> Tensor:
            if position != "time":
                return n[e]
            if e not in timed:
                timed[e] = n[e] + self.time_embed(state.layouts[e]).to(n[e].dtype)
            return timed[e]

        summed: dict[str, Tensor] = {}
        for name, (q, k, window) in self.directions.items():
            pos = self.positions[name]
            fn = functools.partial(self.cross[name], attn=self.attention_of(name))
            with attention_label(name, query=q, key=k):  # "<operator>/<step>/<direction>" (inspect)
                out = windowed(fn, inputs(q, pos), state.layouts[q], window, kv=inputs(k, pos),
                               kv_layout=state.layouts[k], query_extras=False, key_extras=False)
            if self.mode == "bottleneck":
                extras = extra_mask(state.layouts[q], out.device)
                if extras is not None:  # official CAST: extras pass their own bottleneck vector through
                    out = torch.where(extras[:, None], n[q], out)
                out = self.act(out)
            summed[q] = summed[q] + out if q in summed else out
        update = {}
        for q, out in summed.items():
            if self.up is not None:
                out = self.up[q](out)
            elif self.adapter is not None:
                out = self.adapter[q](out)
            update[q] = state.x[q] + self.drop_path(out)
        return update

    def extra_repr(self) -> str:
        dirs = ", ".join(f"{n}: {k}->{q} ({w.name}, {self.positions[n]})" for n, (q, k, w) in self.directions.items())
        share = ", share=pair" if self.pairs is not None else ""
        return f"mode={self.mode}{share}, width={self.width}, directions=[{dirs}]"


def pair_key(a: str, b: str) -> str:
    """Name of the unordered expert pair ``{a, b}`` (``pairs`` key of ``share: pair``)."""
    return "_".join(sorted((a, b)))


def extra_mask(layout: TokenLayout, device: torch.device) -> Tensor | None:
    """``(L,)`` bool, ``True`` at the extra tokens of ``layout`` (``None`` without extras)."""
    if layout.extras == 0:
        return None
    mask = torch.zeros(layout.length, dtype=torch.bool, device=device)
    mask[layout.extra_index().reshape(-1).to(device)] = True
    return mask


__all__ = ["BCA", "CrossDirection", "extra_mask", "pair_key", "window_length"]
