"""``lavish``: latent audio-visual hybrid adapters (LAVISH §3.2–3.3, official-code maths).

LAVISH adapts one frozen image ViT (or Swin) shared by audio and video. Every layer gets four
adapters, two per stream, each with its own parameters and latent tokens, added *in parallel* to
the attention and to the MLP (paper eq. 4–5, layer norms omitted as in the paper)::

    Y_v = X_v + MHA(X_v) + LAV(X_a → X_v)        Y_a = X_a + MHA(X_a) + LAV(X_v → X_a)
    X_v' = Y_v + MLP(Y_v) + LAV(Y_a → Y_v)       X_a' = Y_a + MLP(Y_a) + LAV(Y_v → Y_a)

One adapter ``LAV(S → T)`` (source tokens ``S`` ``(B, L_s, C)``, target ``T`` ``(B, L_t, C)``), as the
official ``VisualAdapter`` (``AVE/nets/net_trans.py``) computes it::

    L'  = L + g_tk · softmax(L · Sᵀ) · S          compression: m latents ``(m, C)`` attend to S
    x   = T + g_av · softmax(T · L'ᵀ) · L'        fusion: T attends to the m compressed latents
    out = g · LN_post(BN(Conv_up(ReLU(BN(Conv_down(LN_before(x)))))))

Where the official code departs from the paper (eq. 6–8) — fusionkit follows the code:

* **compression of the other modality**: the paper compresses each modality into its *own* latents
  (eq. 7, ``S_a = CMA(L_a, X_a, X_a)``); the code's latents belong to the adapter of target ``T`` and
  attend to the *source* stream ``S`` (the adapter's second argument, ``vis_token``);
* **K = V**: the paper's fusion reads keys from the other modality's summary and values from the
  own one (eq. 8, ``CMA(X_a, S_v, S_a)``); in the code keys and values are both the compressed
  source latents ``L'``;
* **gates**: both attentions are gated as in eq. 6, by two learnable scalars of their own: ``g_tk``
  (``gate_tk``) on the compression, initialised to **1**, and ``g_av`` (``gate_av``) on the fusion,
  initialised to 0. ``g_tk`` is a parameter only with ``latent_gate: true`` (the LAVISH recipes);
  without it the compression is ungated (``g_tk ≡ 1``), as the binding benchmark's recorded runs have it;
* **bottleneck**: eq. 9 is ``θ_up(σ(θ_down(x)))``; the output gate ``g`` (``gate``, 0 at init), the two
  layer norms and the two batch norms are the code's additions.

Both attentions are single-head, without projections or ``1/√C`` scaling (they go through
:func:`fusionkit.attention.attention` with ``scale=1``); ``Conv_down`` / ``Conv_up`` are grouped 1×1
convolutions ``C → C/r → C`` (``groups=2``, no bias), i.e. per-token block-diagonal linears.
The batch norms normalise over every token of the batch (a ``BatchNorm2d`` over ``(B, C, L, 1)`` in
the official code). AVISH (ablation, Table 4) drops the latents: ``x = T + g_av · softmax(T · Sᵀ) · S``.

Windows: the attention runs within windows of the two layouts (:func:`fusionkit.attention.windowed`):
``space`` (default whenever both experts have the same number of frames) pairs frame ``t`` of the
target with frame ``t`` of the source, each with its own latents, which is how the official code
treats the 1-second AVE segments (one image + one spectrogram each); ``global`` uses whole clips.

Site ``replace_attn``. At step ``ℓ`` the operator

1. computes the attention-parallel adapters from the pre-attention tokens ``X``,
2. runs each joined expert's frozen attention step itself (``layer.attend``) and adds them → ``Y``,
3. computes the MLP-parallel adapters from ``Y`` of both streams, passes them on in the step's
   ``state.carry`` while the graph runs every expert's MLP step, and adds them at ``post_mlp``: ``X' = Y + MLP(Y) + LAV(Y_s → Y_e)``
   (the operator acts at two sites, ``sites = ("replace_attn", "post_mlp")``).

At init ``g_av`` and ``g`` are 0, so every adapter outputs exactly 0 and the graph computes what the
experts compute alone. Parameters (``fusions.<name>.<step>.``)::

    attn_adapters.<src>_to_<tgt>.latents (m, C)   latent_gate (1,) (latent_gate: true)   fusion_gate (1,)
    norm_before.*   down.weight (C/r, C/2, 1)   down_norm.* (BatchNorm C/r)   up.weight (C, C/(2r), 1)
    up_norm.* (BatchNorm C)   norm_after.*   gate (1,)
    mlp_adapters.<src>_to_<tgt>.… (the same)

Adapters are sized by the width of the step (``dims``), so stage-wise backbones (Swin) get
adapters of each stage's width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from fusionkit.attention import TokenLayout, attention, attention_label, windowed
from fusionkit.experts.layer import StepLayer
from fusionkit.fusion.base import FusionOp, SiteState
from fusionkit.fusion.directions import parse_directions
from fusionkit.registry import FUSIONS

LATENT_INITS = ("uniform", "zeros")
WINDOWS = ("auto", "space", "global")


def single_head_attention(q: Tensor, kv: Tensor) -> Tensor:
    """``softmax(q · kvᵀ) · kv`` for ``q`` ``(B', S_q, C)`` and ``kv`` ``(B', S_k, C)``: one head, keys =
    values = ``kv``, no projections, no scaling (LAVISH's cross-modal attention)."""
    return attention(q[:, None], kv[:, None], kv[:, None], scale=1.0)[:, 0]


class LatentAdapter(nn.Module):
    """One ``LAV(S → T)`` adapter of width ``C`` (see the module docstring); output 0 at init.

    Args:
        dim: token width ``C`` of source and target.
        latents: ``m``, the number of latent tokens; 0 gives the AVISH variant (no latents).
        reduction: ``r``, bottleneck width ``C / r`` (rounded up to a multiple of ``groups``).
        groups: groups of the two 1×1 convolutions (2 in LAVISH).
        latent_init: ``uniform`` (``U[0, 1)``, AVE) or ``zeros`` (AVQA).
        latent_gate: a learnable gate ``g_tk`` (initialised to 1) on the compression, the official
            ``gate_tk``; ``False``: ungated compression.
        norm_eps: epsilon of the two layer norms.
    """

    def __init__(self, dim: int, latents: int = 2, reduction: int = 8, groups: int = 2,
                 latent_init: str = "uniform", latent_gate: bool = False, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if latent_init not in LATENT_INITS:
            raise ValueError(f"lavish: unknown latent_init {latent_init!r}; valid: {', '.join(LATENT_INITS)}")
        if latents < 0 or reduction < 1 or groups < 1:
            raise ValueError(f"lavish: latents must be >= 0, reduction and groups >= 1 "
                             f"(got {latents}, {reduction}, {groups})")
        if dim % groups:
            raise ValueError(f"lavish: width {dim} is not divisible by groups={groups}")
        hidden = -(-max(dim // reduction, 1) // groups) * groups
        self.dim, self.hidden = dim, hidden
        init = torch.rand if latent_init == "uniform" else torch.zeros
        self.latents = nn.Parameter(init(latents, dim)) if latents > 0 else None
        self.latent_gate = nn.Parameter(torch.ones(1)) if latent_gate and latents > 0 else None  # g_tk
        self.fusion_gate = nn.Parameter(torch.zeros(1))  # g_av of the official code
        self.norm_before = nn.LayerNorm(dim, eps=norm_eps)
        self.down = nn.Conv1d(dim, hidden, 1, groups=groups, bias=False)
        self.down_norm = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU()
        self.up = nn.Conv1d(hidden, dim, 1, groups=groups, bias=False)
        self.up_norm = nn.BatchNorm1d(dim)
        self.norm_after = nn.LayerNorm(dim, eps=norm_eps)
        self.gate = nn.Parameter(torch.zeros(1))  # output gate

    def exchange(self, target: Tensor, *, kv: Tensor, bias: Any = None) -> Tensor:
        """Gated fusion term ``g_av · softmax(T · L'ᵀ) · L'`` of one window: ``(B', S_t, C)`` from target
        ``(B', S_t, C)`` and source ``kv`` ``(B', S_s, C)`` (the ``windowed`` calling convention)."""
        if bias is not None:
            raise ValueError("lavish: windows of unequal lengths are not supported (use window: global or space "
                             "over layouts whose frames all hold the same number of tokens)")
        if self.latents is None:  # AVISH: the target attends to every source token
            return self.fusion_gate * single_head_attention(target, kv)
        lat = self.latents.to(kv.dtype).expand(kv.shape[0], -1, -1)
        summary = single_head_attention(lat, kv)
        lat = lat + (summary if self.latent_gate is None else self.latent_gate * summary)  # compression L' (B', m, C)
        return self.fusion_gate * single_head_attention(target, lat)

    def bottleneck(self, x: Tensor) -> Tensor:
        """``g · LN(BN(Conv(ReLU(BN(Conv(LN x))))))`` on tokens ``(B, L, C)``."""
        h = self.norm_before(x).transpose(1, 2)  # (B, C, L): batch norms over all B·L tokens
        h = self.up_norm(self.up(self.act(self.down_norm(self.down(h)))))
        return self.gate * self.norm_after(h.transpose(1, 2))

    def forward(self, source: Tensor, target: Tensor, source_layout: TokenLayout | None = None,
                target_layout: TokenLayout | None = None, window: str = "global") -> Tensor:
        """Adapter output ``(B, L_t, C)`` (to be added to the residual stream) for source ``(B, L_s, C)``
        and target ``(B, L_t, C)``; without layouts each sample is one window."""
        if source_layout is None or target_layout is None:
            fused = self.exchange(target, kv=source)
        else:
            fused = windowed(self.exchange, target, target_layout, window, kv=source, kv_layout=source_layout)
        return self.bottleneck(target + fused)

    def extra_repr(self) -> str:
        m = 0 if self.latents is None else self.latents.shape[0]
        return f"dim={self.dim}, latents={m}{' (AVISH)' if m == 0 else ''}, hidden={self.hidden}"


@FUSIONS.register("lavish")
class LAVISH(FusionOp):
    """LAVISH latent audio-visual adapters in parallel to attention and MLP (LAVISH eq. 4–9).

    Args:
        experts, dims, layouts, drop_path: given by the graph.
        directions: ``[source->target, ...]`` or ``{name: {query: target, key: source, window}}``
            (:mod:`fusionkit.fusion.directions`); each gives its target two adapters (attention- and
            MLP-parallel). Default: every ordered pair of the joined experts. A2V only: ``[audio->video]``;
            a stream may adapt from itself (``audio->audio``) for the ablations that keep a uni-modal adapter.
        latents: ``m``, latent tokens per adapter (AVE 2, AVS/AVQA 16); 0 = AVISH.
        avish: the AVISH variant (no latents: targets attend to all source tokens).
        reduction: ``r``, bottleneck reduction (AVE 8, AVS/AVQA 4).
        groups: groups of the 1×1 convolutions (2).
        latent_init: ``uniform`` (AVE) or ``zeros`` (AVQA).
        latent_gate: a learnable gate on the latents' compression, initialised to 1 (official
            ``gate_tk``; the LAVISH recipes); ``false`` keeps it ungated.
        window: the directions' default window: ``auto`` (``space`` when both experts have the same
            number of frames, else ``global``), ``space`` (frame ``t`` with frame ``t``) or ``global``.
        mlp: add the MLP-parallel adapters (the paper's design; ``false`` keeps only the attention ones).
        norm_eps: epsilon of the adapters' layer norms.
    """

    sites = ("replace_attn", "post_mlp")  # adapters beside the attention, then beside the MLP
    zero_init = True  # g_av and the output gate start at 0: every adapter outputs exactly 0

    def __init__(self, *, experts: list[str], dims: Mapping[str, int], layouts: Mapping[str, TokenLayout],
                 drop_path: float = 0.0,
                 directions: Sequence[str] | Mapping[str, Any] | None = None, latents: int = 2, avish: bool = False,
                 reduction: int = 8, groups: int = 2, latent_init: str = "uniform", latent_gate: bool = False,
                 window: str = "auto", mlp: bool = True, norm_eps: float = 1e-5) -> None:
        super().__init__(experts=experts)
        parsed = parse_directions("lavish", experts, directions, window=window, same=True)
        for name, d in parsed.items():
            if d.window not in WINDOWS:
                raise ValueError(f"lavish: unknown window {d.window!r} (direction {name!r}); valid: {', '.join(WINDOWS)}")
            if dims[d.key] != dims[d.query]:
                raise ValueError(f"lavish: direction {name!r} ({d}) joins widths {dims[d.key]} and {dims[d.query]}; "
                                 "the latent attention has no projections and needs equal widths")
        self.pairs = {name: (d.key, d.query) for name, d in parsed.items()}  # name → (source, target)
        self.windows = {name: self._window(d.window, layouts[d.key], layouts[d.query]) for name, d in parsed.items()}
        m = 0 if avish else latents
        options = dict(latents=m, reduction=reduction, groups=groups, latent_init=latent_init,
                       latent_gate=latent_gate, norm_eps=norm_eps)
        self.attn_adapters = nn.ModuleDict({n: LatentAdapter(dims[t], **options) for n, (_, t) in self.pairs.items()})
        self.mlp_adapters = nn.ModuleDict({n: LatentAdapter(dims[t], **options) for n, (_, t) in self.pairs.items()}) \
            if mlp else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @staticmethod
    def _window(window: str, source: TokenLayout, target: TokenLayout) -> str:
        if window == "auto":
            return "space" if source.t == target.t else "global"
        if window == "space" and source.t != target.t:
            raise ValueError(f"lavish: window 'space' pairs frames, but the layouts have {source.t} and {target.t} "
                             "frames; use window: global")
        return window

    def _updates(self, adapters: nn.ModuleDict, x: Mapping[str, Tensor],
                 layouts: Mapping[str, TokenLayout]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, (s, t) in self.pairs.items():
            with attention_label(name, query=t, key=s):  # recorded as "<operator>/<step>/<direction>"
                y = self.drop_path(adapters[name](x[s], x[t], layouts[s], layouts[t], self.windows[name]))
            out[t] = out[t] + y if t in out else y
        return out

    def forward(self, state: SiteState) -> dict[str, Tensor]:
        """At ``replace_attn``: post-attention tokens ``Y_e`` ``(B, L_e, C)`` of every joined expert (eq. 4–5,
        first lines); at ``post_mlp``: ``Y_e + MLP(Y_e)`` plus the MLP-parallel adapters (second lines)."""
        if state.site == "post_mlp":
            return {e: state.x[e] + update for e, update in state.carry.pop("mlp", {}).items()}
        for e in self.experts:
            if not isinstance(state.layers.get(e), StepLayer):
                raise ValueError(f"lavish at step {state.step}: expert {e!r} has no transformer layer with an "
                                 "attention step here (e.g. a Swin patch merging); leave this step out of the "
                                 "operator's steps")
        x = {e: state.x[e] for e in self.experts}
        extra = self._updates(self.attn_adapters, x, state.layouts)
        y = {e: state.layers[e].attend(x[e], state.layouts[e]) for e in self.experts}
        y = {e: y[e] + extra[e] if e in extra else y[e] for e in self.experts}
        if self.mlp_adapters is not None:  # added at post_mlp, after the graph ran the experts' MLP steps
            state.carry["mlp"] = self._updates(self.mlp_adapters, y, state.layouts)
        return y

    def extra_repr(self) -> str:
        dirs = ", ".join(f"{s}->{t} ({self.windows[n]})" for n, (s, t) in self.pairs.items())
        return f"directions=[{dirs}], mlp={self.mlp_adapters is not None}"


__all__ = ["LAVISH", "LatentAdapter", "single_head_attention"]
