"""``avstfp``: spatial-temporal-fusion prompting of one frozen, shared image tower (AV-STFP).

AV-STFP runs audio and video through *one* frozen CLIP vision tower (video: ``M`` frames; audio:
``M`` spectrogram chunks through the :class:`~fusionkit.experts.shared.SharedExpert`). Every layer
re-uses its frozen attention three times, then the graph runs each stream's frozen FFN
(``block.feed_forward``). This operator replaces the attention step (site ``replace_attn``) of the
experts it joins, ``[a, v]`` (audio first, as in ``[A, P_fusion, V]``)::

    1. temporal  (eq. 1-2), per stream e, ``time`` window: one sequence per location across
       the T frames (the CLS of all frames form their own sequence)
         h   = LN1(x_e)                                                     (B·(E+N), T, D)
         x_e = x_e + β_e · DP(ls1(MHSA(q = h, k = [h, P_key,e], v = [h, P_val,e])))
    2. spatial   (eq. 3-4, VPT-deep), per stream e, in the block's own window (``space`` for
       CLIP: one sequence per frame; ``spatial_window`` overrides it)
         x_e = x_e + drop_path1(ls1(MHSA(q = LN1 x_e, kv = [LN1 x_e, LN1 P_s,e])))
       the prompts' own outputs Z are discarded (never computed: queries are the tokens only;
       the N_s prompts are appended to every sequence of the window)
    3. fusion    (eq. 5), per frame (``fusion_window: frame``, default) or whole clip (``clip``)
         [x_a, x_v] += β_av · DP(ls1(MHSA(q = [LN1 x_a, LN1 x_v], kv = [LN1 x_a, LN1 P_f, LN1 x_v])))
       one set of fusion prompts shared by both streams; their outputs are discarded.

MHSA is always the block's frozen :class:`~fusionkit.attention.Attention` (its ``qkv`` projects
queries, keys and values, prompts included; its ``proj`` maps the output). Decisions where the
paper is silent (it has no public code):

* **Prompts pass through the frozen W_K / W_V** (and their biases): they are tokens of the
  attention's input, entering after LN and before the projections.
* **LN and prompts.** Temporal key/value prompts are appended to K and V only, after ``LN1``
  (eq. 1 applies LN to ``A_t``, the prompts are concatenated to the keys/values): they are
  learned directly in the normalised space and never normalised. Spatial and fusion prompts are
  tokens of the sequence, ``MHSA(LN([A, P]))`` as printed in eq. 4-5, so ``LN1`` applies to
  them too (``prompt_norm: false`` feeds them un-normalised).
* **β.** One learnable scalar per layer and stream for the temporal stage (β_a, β_v) and one per
  layer for the fusion stage (β_av); initial values ``beta_temporal`` / ``beta_fusion`` (default
  0.1: close to the frozen image model at the start, yet every prompt gets a gradient at once;
  0 makes the two stages exact identities at init).
* **ls1 / drop path.** Every stage's attention output goes through the block's ``ls1`` (layer
  scale belongs to the frozen attention; identity for CLIP). The spatial stage is the block's own
  attention step with prompts, so it uses the block's ``drop_path1`` (and its attention adapter
  in series, if one was attached); the temporal and fusion stages are branches this operator
  adds, so they use the operator's stochastic depth (the graph's ``drop_path`` rate at this step).
* **Fusion attention.** In AV-STFP both streams share one tower; if the joined experts are two
  distinct transformers (of one width) the fusion stage runs the frozen attention and ``LN1`` of
  ``fusion_expert`` (default: the first joined expert) on the tokens of both.

Ablations (paper Table 4): ``stages`` is any subset of ``"TSF"`` (``"none"`` for no prompting
stage). A stage that is off adds no parameters; the temporal and fusion stages are then skipped,
while the spatial stage falls back to the block's frozen attention without prompts (the image
model's own attention, which every variant keeps). A prompt count of 0 instead keeps the stage's
attention pass and β without prompts.

Parameters per layer (width D, each joined stream e): ``temporal_key.e``, ``temporal_value.e``
``(N_t, D)``, ``beta_temporal.e`` ``()``, ``spatial.e`` ``(N_s, D)``, ``fusion`` ``(N_f, D)``,
``beta_fusion`` ``()``. ViT-L/14 (D = 1024, 24 layers, two streams): 196,608 + 491,520 + 49,152
prompt values and 72 β.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from fusionkit.attention import Attention, TokenLayout, make_window, windowed
from fusionkit.experts.block import Block
from fusionkit.fusion.base import FusionOp, SiteState
from fusionkit.registry import FUSIONS

STAGES = "TSF"
FUSION_WINDOWS = ("frame", "clip")  # window aliases (fusionkit.attention.windows): space, global


def parse_stages(stages: str | Sequence[str] | None) -> str:
    """``"TSF"`` / ``"ts"`` / ``["T", "F"]`` / ``"none"`` → the canonical subset of ``"TSF"``."""
    if stages is None:
        return ""
    if isinstance(stages, str):
        text = "" if stages.strip().lower() in ("", "none", "-") else stages
        letters = [c for c in text.upper() if c not in " ,+_-"]
    else:
        letters = [str(s).upper() for s in stages]
    bad = [c for c in letters if c not in STAGES]
    if bad or len(set(letters)) != len(letters):
        raise ValueError(f"avstfp: stages must be a subset of 'TSF' (T temporal, S spatial, F fusion) or 'none', "
                         f"got {stages!r}")
    return "".join(c for c in STAGES if c in letters)


def prompted_attention(attn: Attention, x: Tensor, key_prompts: Tensor | None, value_prompts: Tensor | None) -> Tensor:
    """Frozen attention of ``x`` ``(B', S, D)`` with extra keys and *different* extra values:
    ``K = W_k [x, P_key]``, ``V = W_v [x, P_val]`` (prompts ``(N, D)`` shared by every sequence);
    returns ``(B', S, D)``."""
    if key_prompts is None or key_prompts.shape[0] == 0:
        return attn(x)
    n = x.shape[0]
    keys = torch.cat([x, key_prompts.to(x.dtype).expand(n, -1, -1)], dim=1)
    values = torch.cat([x, value_prompts.to(x.dtype).expand(n, -1, -1)], dim=1)
    return attn(x, kv=keys, values=values)


def _prompts(num: int, dim: int, std: float) -> nn.Parameter:
    p = nn.Parameter(torch.empty(num, dim))
    if num:
        nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
    return p


@FUSIONS.register("avstfp")
class AVSTFP(FusionOp):
    """AV-STFP temporal / spatial / fusion prompting of a shared frozen tower (AV-STFP eq. 1-5).

    Args:
        experts: the joined streams ``[audio, video]`` (the fusion sequence is ``[a, P_f, v]``);
            ``dims`` / ``layouts`` at this step are given by the graph.
        stages: the prompting stages that run, a subset of ``"TSF"`` (default all; ``"none"``).
        temporal_prompts: ``N_t`` key prompts and as many value prompts per stream (paper: 2).
        spatial_prompts: ``N_s`` prompt tokens per stream (paper: 10).
        fusion_prompts: ``N_f`` prompt tokens shared by both streams (paper: 2).
        beta_temporal, beta_fusion: initial β_a = β_v and β_av (learnable scalars per layer).
        fusion_window: ``frame`` (one fusion sequence per frame: both streams need the same number
            of frames / chunks) or ``clip`` (all tokens of both streams in one sequence).
        prompt_norm: apply ``LN1`` to the spatial and fusion prompts (eq. 4-5 as printed).
        fusion_expert: whose frozen attention / ``LN1`` the fusion stage uses (default: the first
            joined expert; the same block as the second one in a shared tower).
        spatial_window: window of the spatial stage (default: each block's own window, ``space``
            for CLIP, i.e. one sequence per frame as in the paper).
        prompt_std: standard deviation of the prompts' truncated-normal initialisation.
        drop_path: stochastic depth of the temporal and fusion branches (the graph's rate).
    """

    site = "replace_attn"

    def __init__(self, *, experts: Sequence[str], dims: Mapping[str, int], layouts: Mapping[str, TokenLayout],
                 drop_path: float = 0.0, stages: str | Sequence[str] = STAGES,
                 temporal_prompts: int = 2, spatial_prompts: int = 10, fusion_prompts: int = 2,
                 beta_temporal: float = 0.1, beta_fusion: float = 0.1, fusion_window: str = "frame",
                 prompt_norm: bool = True, fusion_expert: str | None = None, spatial_window: str | None = None,
                 prompt_std: float = 0.02) -> None:
        super().__init__(experts=experts)
        self.stages = parse_stages(stages)
        for name, n in (("temporal_prompts", temporal_prompts), ("spatial_prompts", spatial_prompts),
                        ("fusion_prompts", fusion_prompts)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"avstfp: {name} must be a non-negative int, got {n!r}")
        if fusion_window not in FUSION_WINDOWS:
            raise ValueError(f"avstfp: unknown fusion_window {fusion_window!r}; valid: {', '.join(FUSION_WINDOWS)}")
        if not self.experts or len(set(self.experts)) != len(self.experts):
            raise ValueError(f"avstfp: needs distinct experts to prompt, got {list(self.experts)}")
        self.fusion_window = fusion_window
        self.spatial_window = make_window(spatial_window) if spatial_window is not None else None
        self.prompt_norm = bool(prompt_norm)
        self.temporal_key = nn.ParameterDict()
        self.temporal_value = nn.ParameterDict()
        self.beta_temporal = nn.ParameterDict()
        self.spatial = nn.ParameterDict()
        if "T" in self.stages:
            for e in self.experts:
                self.temporal_key[e] = _prompts(temporal_prompts, dims[e], prompt_std)
                self.temporal_value[e] = _prompts(temporal_prompts, dims[e], prompt_std)
                self.beta_temporal[e] = nn.Parameter(torch.tensor(float(beta_temporal)))
        if "S" in self.stages and spatial_prompts:
            for e in self.experts:
                self.spatial[e] = _prompts(spatial_prompts, dims[e], prompt_std)
        self.fusion: nn.Parameter | None = None
        self.beta_fusion: nn.Parameter | None = None
        self.fusion_expert: str | None = None
        if "F" in self.stages:
            if len(self.experts) != 2:
                raise ValueError(f"avstfp: the fusion stage joins two streams [audio, video], got experts "
                                 f"{list(self.experts)} (set stages without F to prompt other counts)")
            a, v = self.experts
            if dims[a] != dims[v]:
                raise ValueError(f"avstfp: the fusion stage runs one frozen attention over both streams, so they "
                                 f"need one width; got {a}: {dims[a]}, {v}: {dims[v]}")
            if fusion_window == "frame" and layouts[a].t != layouts[v].t:
                raise ValueError(f"avstfp: per-frame fusion needs the same number of frames in both streams, got "
                                 f"{a}: {layouts[a].t} and {v}: {layouts[v].t} (make the audio chunks equal the "
                                 "video frames, or set fusion_window=clip)")
            self.fusion_expert = fusion_expert or a
            if self.fusion_expert not in self.experts:
                raise ValueError(f"avstfp: fusion_expert {fusion_expert!r} is not one of the joined experts "
                                 f"{list(self.experts)}")
            self.fusion = _prompts(fusion_prompts, dims[a], prompt_std)
            self.beta_fusion = nn.Parameter(torch.tensor(float(beta_fusion)))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    # helpers -------------------------------------------------------------------------------------

    def _layer(self, state: SiteState, e: str) -> nn.Module:
        layer = state.layers.get(e)
        if layer is None:
            raise ValueError(f"avstfp at step {state.step}: expert {e!r} has no layer at this step (align the "
                             f"streams, or restrict the operator's steps); active: {sorted(state.layers)}")
        if not isinstance(layer, Block):
            raise ValueError(f"avstfp: expert {e!r} layer is a {type(layer).__name__}, not a transformer Block "
                             "(norm1 / attn): AV-STFP re-runs frozen attention")
        return layer

    @staticmethod
    def _uniform(fn):  # noqa: ANN001, ANN205 - windowed() callback that refuses packed (ragged) windows
        def run(x: Tensor, kv: Tensor | None = None, bias: object = None) -> Tensor:
            if bias is not None:
                raise ValueError("avstfp: ragged windows are not supported (sequences of one length expected)")
            return fn(x)
        return run

    # stages ----------------------------------------------------------------------------------------

    def temporal(self, x: Tensor, layout: TokenLayout, layer: nn.Module, e: str) -> Tensor:
        """Eq. 1-2: ``x + β_e · DP(ls1(MHSA(LN1 x; K=[., P_key], V=[., P_val])))`` per location, ``(B, L, D)``."""
        pk, pv = self.temporal_key[e], self.temporal_value[e]
        out = windowed(self._uniform(lambda h: prompted_attention(layer.attn, h, pk, pv)), layer.norm1(x), layout,
                       "time")
        return x + self.drop_path(self.beta_temporal[e] * layer.ls1(out))

    def spatial_step(self, x: Tensor, layout: TokenLayout, layer: nn.Module, e: str) -> Tensor:
        """Eq. 3-4 (VPT-deep): the block's frozen attention (per frame for CLIP) with ``N_s`` prompts as extra
        keys/values in every sequence, ``(B, L, D)``."""
        prompts = self.spatial[e] if e in self.spatial else None
        if prompts is not None:
            p = (layer.norm1(prompts) if self.prompt_norm else prompts).to(x.dtype)

            def fn(h: Tensor) -> Tensor:
                return layer.attn(h, kv=torch.cat([h, p.expand(h.shape[0], -1, -1)], dim=1))
        else:
            fn = layer.attn
        window = self.spatial_window or getattr(layer, "window", None) or make_window("space")
        return layer.attention_residual(x, windowed(self._uniform(fn), layer.norm1(x), layout, window))

    def fuse(self, xa: Tensor, xv: Tensor, la: TokenLayout, lv: TokenLayout, norm_a: nn.Module,
             norm_v: nn.Module, layer: nn.Module) -> tuple[Tensor, Tensor]:
        """Eq. 5: ``[A, V] += β_av · DP(ls1(MHSA([LN A, LN P_f, LN V])))`` per frame or clip (prompt outputs dropped)."""
        window = make_window(self.fusion_window)
        pa, pv = window.plan(la), window.plan(lv)
        for plan, what in ((pa, "audio"), (pv, "video")):
            if not plan.uniform:
                raise ValueError(f"avstfp: the {what} stream's {window.name} window is ragged")
        b = xa.shape[0]
        ga, gv = pa.group(norm_a(xa)), pv.group(norm_v(xv))  # (B·G, S_a, D), (B·G, S_v, D)
        if ga.shape[0] != gv.shape[0]:
            raise ValueError(f"avstfp: fusion windows differ: {ga.shape[0] // b} audio vs {gv.shape[0] // b} video "
                             "sequences per sample")
        parts = [ga]
        if self.fusion.shape[0]:
            p = (layer.norm1(self.fusion) if self.prompt_norm else self.fusion).to(ga.dtype)
            parts.append(p.expand(ga.shape[0], -1, -1))
        kv = torch.cat([*parts, gv], dim=1)
        out = layer.ls1(layer.attn(torch.cat([ga, gv], dim=1), kv=kv))
        sa = ga.shape[1]
        oa, ov = pa.ungroup(out[:, :sa], b), pv.ungroup(out[:, sa:], b)
        return xa + self.drop_path(self.beta_fusion * oa), xv + self.drop_path(self.beta_fusion * ov)

    def forward(self, state: SiteState) -> dict[str, Tensor]:
        """New post-attention tokens ``(B, L_e, D)`` of every joined stream (the graph then runs the FFN)."""
        layers = {e: self._layer(state, e) for e in self.experts}
        x = {e: state.x[e] for e in self.experts}
        for e in self.experts:
            if "T" in self.stages:
                x[e] = self.temporal(x[e], state.layouts[e], layers[e], e)
            x[e] = self.spatial_step(x[e], state.layouts[e], layers[e], e)
        if "F" in self.stages:
            a, v = self.experts
            layer = layers[self.fusion_expert]
            x[a], x[v] = self.fuse(x[a], x[v], state.layouts[a], state.layouts[v], layer.norm1, layer.norm1, layer)
        return x

    def extra_repr(self) -> str:
        n_t = next(iter(self.temporal_key.values())).shape[0] if len(self.temporal_key) else 0
        n_s = next(iter(self.spatial.values())).shape[0] if len(self.spatial) else 0
        n_f = self.fusion.shape[0] if self.fusion is not None else 0
        return (f"stages={self.stages or 'none'}, prompts(T/S/F)={n_t}/{n_s}/{n_f}, "
                f"fusion_window={self.fusion_window}, prompt_norm={self.prompt_norm}")


__all__ = ["AVSTFP", "parse_stages", "prompted_attention"]
