"""B-CA (CAST / CA²ST bottleneck cross-attention) against independent references.

The references below never call ``windowed``, window plans or ``TokenLayout.patch_index``: token
positions come from the storage orders documented in ``fusionkit/attention/layout.py``, window
membership from the CAST spec (docs: /work/shared/specs/cast-ca2st.md §2), and the attention is
written with einsum. Tiny models are built from dict recipes (timm_vit / videomae_vit / ast with
64-wide, 3-layer transformers) so the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fusionkit
from fusionkit.attention import TokenLayout, use_backend
from fusionkit.fusion.base import SiteState
from fusionkit.fusion.bca import BCA
from fusionkit.fusion.time_embed import TimeIntervalMLP, token_intervals

ATOL = 1e-5
BATCH = 2

# ---------------------------------------------------------------------------------------------
# tiny recipes

T_FRAMES, GRID = 4, 3  # 8 input frames -> 4 CLIP-style frames / 4 tubelets, 48 px / 16 -> 3x3 patches
MEL, AUDIO_FRAMES = 32, 106  # AST grid: (32-16)//10+1 = 2 rows, (106-16)//10+1 = 10 columns


def spatial_expert(**extra) -> dict:
    return {"type": "timm_vit", "name": "vit_tiny_patch16_224", "img_size": 48, "depth": 3, "embed_dim": 64,
            "num_heads": 4, "frame_select": {"stride": 2, "offset": 1}, **extra}


def temporal_expert(**extra) -> dict:
    return {"type": "videomae_vit", "embed_dim": 64, "depth": 3, "num_heads": 4, "img_size": 48,
            "num_frames": 8, **extra}


def audio_expert(**extra) -> dict:
    return {"type": "ast", "embed_dim": 48, "depth": 3, "num_heads": 4, "num_mel_bins": MEL,
            "max_length": AUDIO_FRAMES, **extra}


CAST_DIRECTIONS = {"t2s": {"query": "spatial", "key": "temporal", "window": "time"},
                   "s2t": {"query": "temporal", "key": "spatial", "window": "space"}}

CA2ST_DIRECTIONS = {
    "a2s": {"query": "spatial", "key": "audio", "window": "global", "position": "time"},
    "s2a": {"query": "audio", "key": "spatial", "window": "global", "position": "time"},
    "t2s": {"query": "spatial", "key": "temporal", "window": "time"},
    "s2t": {"query": "temporal", "key": "spatial", "window": "space"},
    "a2t": {"query": "temporal", "key": "audio", "window": "global", "position": "time"},
    "t2a": {"query": "audio", "key": "temporal", "window": "global", "position": "time"},
}


def cast_recipe(adapters: bool = True) -> dict:
    """CAST in miniature: spatial (ViT per frame, CLS) + temporal (VideoMAE), B-CA in every layer."""
    ad = {"adapters": {"ratio": 0.25}} if adapters else {}
    return {
        "inputs": {"video": [3, 8, 48, 48]},
        "experts": {"spatial": spatial_expert(**ad), "temporal": temporal_expert(**ad)},
        "fusion": {"bca": {"type": "bca", "experts": ["spatial", "temporal"], "heads": 4, "ratio": 0.5,
                           "position": "learned", "directions": copy.deepcopy(CAST_DIRECTIONS)}},
        "heads": {"verb": {"type": "linear", "expert": "temporal", "classes": 5},
                  "noun": {"type": "linear", "expert": "spatial", "classes": 7}},
        "trainable": {"unfreeze": ["experts.temporal.pool_norm.*"]},
    }


def ca2st_recipe() -> dict:
    """CA²ST in miniature: audio (AST, 48 wide) + spatial + temporal, six directions in one B-CA."""
    return {
        "inputs": {"video": [3, 8, 48, 48], "audio": [AUDIO_FRAMES, MEL]},
        "experts": {"audio": audio_expert(adapters={"ratio": 0.25}),
                    "spatial": spatial_expert(adapters={"ratio": 0.25}),
                    "temporal": temporal_expert(adapters={"ratio": 0.25})},
        "fusion": {"bca": {"type": "bca", "experts": ["audio", "spatial", "temporal"], "heads": 4, "ratio": 0.5,
                           "position": "learned", "directions": copy.deepcopy(CA2ST_DIRECTIONS)}},
        "heads": {"label": {"type": "adapter_sum", "experts": ["spatial", "temporal"], "classes": 6}},
    }


def video_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.randn(BATCH, 3, 8, 48, 48, generator=g)}


def av_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return {**video_batch(seed), "audio": torch.randn(BATCH, AUDIO_FRAMES, MEL, generator=g)}


def bca_ops(model) -> list[BCA]:
    return [op for ops in model.fusions.values() for op in ops.values()]


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.15) -> None:
    """Every parameter random and non-zero (LayerNorm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        p.copy_(1 + noise if (".norm." in f".{name}" and name.endswith("weight")) else noise)


@torch.no_grad()
def enliven(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every all-zero trainable tensor (up-projections, zero-init output projections and
    adapter up-projections, biases) small random values so every trainable tensor gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


# ---------------------------------------------------------------------------------------------
# independent reference

SPATIAL = TokenLayout(T_FRAMES, GRID, GRID, extras=1, per_frame_extras=True)
TEMPORAL = TokenLayout(T_FRAMES, GRID, GRID)
AUDIO = TokenLayout(1, 2, 10, extras=2, per_frame_extras=False)


def pos(layout: TokenLayout, t: int, n: int) -> int:
    """Stored position of patch ``n`` (row-major in the frame) of frame ``t`` (layout.py docstring)."""
    frame = layout.h * layout.w
    if layout.per_frame_extras:
        return t * (layout.extras + frame) + layout.extras + n
    return layout.extras + t * frame + n


def patch_positions(layout: TokenLayout) -> set[int]:
    return {pos(layout, t, n) for t in range(layout.t) for n in range(layout.h * layout.w)}


def ref_windows(window: str, ql: TokenLayout, kl: TokenLayout) -> list[tuple[list[int], list[int]]]:
    """(query positions, key positions) per window, patches only, in window-position order."""
    if window == "time":  # one sequence per location n, over all steps
        assert ql.h * ql.w == kl.h * kl.w
        return [([pos(ql, t, n) for t in range(ql.t)], [pos(kl, t, n) for t in range(kl.t)])
                for n in range(ql.h * ql.w)]
    if window == "space":  # one sequence per frame t, over its patches
        assert ql.t == kl.t
        return [([pos(ql, t, n) for n in range(ql.h * ql.w)], [pos(kl, t, n) for n in range(kl.h * kl.w)])
                for t in range(ql.t)]
    assert window in ("global", "space-time")
    return [([pos(ql, t, n) for t in range(ql.t) for n in range(ql.h * ql.w)],
             [pos(kl, t, n) for t in range(kl.t) for n in range(kl.h * kl.w)])]


def d64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def ref_linear(x, lin):
    return x @ d64(lin.weight).T + d64(lin.bias)


def ref_layernorm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * d64(ln.weight) + d64(ln.bias)


def ref_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_mhca(q_in, kv_in, attn, heads):
    """Cross-attention with the fused qkv weights split by hand: (B, S, d), (B, S', d) -> (B, S, d)."""
    d = q_in.shape[-1]
    w, b = d64(attn.qkv.weight), d64(attn.qkv.bias)
    q = q_in @ w[:d].T + b[:d]
    k = kv_in @ w[d:2 * d].T + b[d:2 * d]
    v = kv_in @ w[2 * d:].T + b[2 * d:]
    hd = d // heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, hd) for t in (q, k, v))
    logits = torch.einsum("bshk,bthk->bhst", q, k) * hd ** -0.5
    out = torch.einsum("bhst,bthk->bshk", logits.softmax(-1), v).reshape(q_in.shape[0], q_in.shape[1], d)
    return ref_linear(out, attn.proj)


def ref_intervals(layout: TokenLayout, groups: int) -> torch.Tensor:
    """(L, 2) [start, end] per token by hand; NaN rows for extras (they get no embedding)."""
    iv = torch.full((layout.length, 2), float("nan"), dtype=torch.float64)
    for t in range(layout.t):
        for n in range(layout.h * layout.w):
            if layout.t > 1:
                slot, count = t, layout.t
            else:  # spectrogram: column w of n = f*W + w belongs to group floor(w*G/W)
                slot, count = (n % layout.w) * groups // layout.w, groups
            iv[pos(layout, t, n)] = torch.tensor([slot / count, (slot + 1) / count])
    return iv


def ref_time_embedding(layout: TokenLayout, tim: TimeIntervalMLP, groups: int) -> torch.Tensor:
    iv = ref_intervals(layout, groups)
    emb = ref_linear(ref_gelu(ref_linear(torch.nan_to_num(iv), tim.mlp[0])), tim.mlp[2])
    emb[iv[:, 0].isnan()] = 0
    return emb


def reference_bca(op: BCA, x: dict[str, torch.Tensor], layouts: dict[str, TokenLayout], directions: dict,
                  position: str, heads: int) -> dict[str, torch.Tensor]:
    """``Y_q + up_q(Σ_k GELU(MHCA(LN(down(Y_q)) + pos_q, LN(down(Y_k)) + pos_kv)))`` per window, extras
    (CLS) getting ``GELU(LN(down(Y)))`` and taking no part in cross-attention."""
    x = {e: d64(v) for e, v in x.items()}
    n = {e: ref_layernorm(ref_linear(x[e], op.down[e]), op.norm[e]) for e in x}
    groups = max(lay.t for lay in layouts.values())
    summed: dict[str, torch.Tensor] = {}
    for name, spec in directions.items():
        q, k, window = spec["query"], spec["key"], spec.get("window", "global")
        mode = spec.get("position", position)
        qin, kin = n[q], n[k]
        if mode == "time":
            qin = qin + ref_time_embedding(layouts[q], op.time_embed, groups)
            kin = kin + ref_time_embedding(layouts[k], op.time_embed, groups)
        out = torch.full_like(n[q], float("nan"))
        cross = op.cross[name]
        for qi, ki in ref_windows(window, layouts[q], layouts[k]):
            qq, kk = qin[:, qi], kin[:, ki]
            if mode == "learned":
                qq, kk = qq + d64(cross.pos_q), kk + d64(cross.pos_kv)
            out[:, qi] = ref_mhca(qq, kk, op.attention_of(name), heads)
        extras = sorted(set(range(layouts[q].length)) - patch_positions(layouts[q]))
        out[:, extras] = n[q][:, extras]
        assert not out.isnan().any()
        summed[q] = summed.get(q, 0) + ref_gelu(out)
    return {q: x[q] + ref_linear(s, op.up[q]) for q, s in summed.items()}


def make_op(directions: dict, *, position: str = "learned", widths: dict | None = None, **options) -> BCA:
    layouts = {"spatial": SPATIAL, "temporal": TEMPORAL, "audio": AUDIO}
    widths = widths or {"spatial": 48, "temporal": 64, "audio": 40}
    used = sorted({e for d in directions.values() for e in (d["query"], d["key"])})
    op = BCA(experts=used, dims={e: widths[e] for e in used}, layouts={e: layouts[e] for e in used},
             directions=copy.deepcopy(directions), heads=4, position=position, **options)
    return op.eval()


def site(op: BCA, seed: int = 0) -> SiteState:
    g = torch.Generator().manual_seed(seed)
    layouts = {"spatial": SPATIAL, "temporal": TEMPORAL, "audio": AUDIO}
    x = {e: torch.randn(BATCH, layouts[e].length, op.down[e].in_features, generator=g) for e in op.norm}
    return SiteState(x, {e: layouts[e] for e in x}, {}, 0)


WINDOW_PAIRS = [("time", "space"), ("space", "space"), ("space-time", "space-time"), ("time", "space-time"),
                ("global", "time")]


# ---------------------------------------------------------------------------------------------
# 1. maths against the reference


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("position", ["learned", "none", "time"])
@pytest.mark.parametrize("windows", WINDOW_PAIRS, ids=["-".join(w) for w in WINDOW_PAIRS])
def test_bca_matches_reference_spatial_temporal(windows, position, backend):
    t2s, s2t = windows
    dirs = {"t2s": {"query": "spatial", "key": "temporal", "window": t2s},
            "s2t": {"query": "temporal", "key": "spatial", "window": s2t}}
    op = make_op(dirs, position=position)
    assert op.width == 32  # ratio 0.5 of the widest (64)
    randomise(op)
    assert all(p.abs().min() > 0 for p in op.parameters())  # up-projections included
    state = site(op)
    with use_backend(backend):
        got = op(state)
    want = reference_bca(op, state.x, state.layouts, dirs, position, heads=4)
    assert set(got) == {"spatial", "temporal"}
    for e in got:
        torch.testing.assert_close(got[e].double(), want[e], atol=ATOL, rtol=0)
        assert not torch.allclose(got[e], state.x[e], atol=1e-3)  # the update is not trivially zero


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_bca_matches_reference_three_experts(backend):
    """CA²ST: two directions into each expert share its down/up projection; GELU outputs are summed
    before the up-projection (its bias applied once); A&S and A&T use time embeddings."""
    op = make_op(CA2ST_DIRECTIONS)
    randomise(op, seed=3)
    state = site(op, seed=3)
    with use_backend(backend):
        got = op(state)
    want = reference_bca(op, state.x, state.layouts, CA2ST_DIRECTIONS, "learned", heads=4)
    assert set(got) == {"audio", "spatial", "temporal"}
    for e in got:
        torch.testing.assert_close(got[e].double(), want[e], atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_bca_share_pair_matches_reference(backend):
    """``share: pair``: one cross-attention per expert pair, run by both its directions (each with its own
    window and positions); the reference runs the pair's attention for both directions by hand."""
    op = make_op(CA2ST_DIRECTIONS, share="pair")
    randomise(op, seed=4)
    assert sorted(op.pairs) == ["audio_spatial", "audio_temporal", "spatial_temporal"]
    assert all(c.attn is None for c in op.cross.values())
    for a, b in (("a2s", "s2a"), ("t2s", "s2t"), ("a2t", "t2a")):
        assert op.attention_of(a) is op.attention_of(b)
    assert {n for n, c in op.cross.items() if c.pos_q is not None} == {"t2s", "s2t"}  # positions per direction
    state = site(op, seed=4)
    with use_backend(backend):
        got = op(state)
    want = reference_bca(op, state.x, state.layouts, CA2ST_DIRECTIONS, "learned", heads=4)
    for e in got:
        torch.testing.assert_close(got[e].double(), want[e], atol=ATOL, rtol=0)
    d = op.width
    assert numel(make_op(CA2ST_DIRECTIONS)) - numel(op) == 3 * (4 * d * d + 4 * d)  # six attentions -> three


def test_bca_share_pair_full_mode_is_identity_at_init():
    dirs = {"t2s": {"query": "spatial", "key": "temporal", "window": "time"},
            "s2t": {"query": "temporal", "key": "spatial", "window": "space"}}
    op = make_op(dirs, share="pair", mode="full", widths={"spatial": 64, "temporal": 64})
    assert list(op.pairs) == ["spatial_temporal"] and not op.pairs["spatial_temporal"].proj.weight.any()
    g = torch.Generator().manual_seed(0)
    layouts = {"spatial": SPATIAL, "temporal": TEMPORAL}
    state = SiteState({e: torch.randn(BATCH, lay.length, 64, generator=g) for e, lay in layouts.items()}, layouts, {}, 0)
    out = op(state)
    assert all(torch.equal(out[e], state.x[e]) for e in out)
    with pytest.raises(ValueError, match="unknown share"):
        make_op(dirs, share="expert")


def test_bca_cls_rule():
    """The spatial CLS gets ``Y_cls + up(GELU(LN(down(Y_cls))))``; no token attends to a CLS."""
    op = make_op(CAST_DIRECTIONS)
    randomise(op, seed=1)
    state = site(op, seed=1)
    out = op(state)
    cls = [t * (1 + GRID * GRID) for t in range(T_FRAMES)]
    y = state.x["spatial"][:, cls]
    want = y + op.up["spatial"](F.gelu(op.norm["spatial"](op.down["spatial"](y))))
    torch.testing.assert_close(out["spatial"][:, cls], want, atol=ATOL, rtol=0)

    # perturb the key-side CLS tokens: S2T (temporal) outputs and spatial patch outputs are unchanged
    x2 = dict(state.x)
    x2["spatial"] = state.x["spatial"].clone()
    x2["spatial"][:, cls] += 10 * torch.randn_like(x2["spatial"][:, cls])
    out2 = op(SiteState(x2, state.layouts, {}, 0))
    torch.testing.assert_close(out2["temporal"], out["temporal"], atol=1e-6, rtol=0)
    patches = sorted(patch_positions(SPATIAL))
    torch.testing.assert_close(out2["spatial"][:, patches], out["spatial"][:, patches], atol=1e-6, rtol=0)
    assert not torch.allclose(out2["spatial"][:, cls], out["spatial"][:, cls])

    # whereas perturbing one spatial patch of frame 0 changes the temporal tokens of frame 0 only
    x3 = dict(state.x)
    x3["spatial"] = state.x["spatial"].clone()
    x3["spatial"][:, pos(SPATIAL, 0, 4)] += 3
    out3 = op(SiteState(x3, state.layouts, {}, 0))
    frame0 = [pos(TEMPORAL, 0, n) for n in range(GRID * GRID)]
    rest = [p for p in range(TEMPORAL.length) if p not in frame0]
    assert (out3["temporal"][:, frame0] - out["temporal"][:, frame0]).abs().amax() > 1e-4
    torch.testing.assert_close(out3["temporal"][:, rest], out["temporal"][:, rest], atol=1e-6, rtol=0)


def test_bca_time_window_attends_only_its_location():
    """T2S: a spatial patch at location n sees the temporal tokens at location n, over all steps."""
    op = make_op(CAST_DIRECTIONS)
    randomise(op, seed=2)
    state = site(op, seed=2)
    out = op(state)
    x2 = dict(state.x)
    x2["temporal"] = state.x["temporal"].clone()
    x2["temporal"][:, pos(TEMPORAL, 3, 5)] += 3  # step 3, location 5
    out2 = op(SiteState(x2, state.layouts, {}, 0))
    changed = (out2["spatial"] - out["spatial"]).abs().amax(dim=(0, 2)) > 1e-5
    assert set(torch.nonzero(changed).flatten().tolist()) == {pos(SPATIAL, t, 5) for t in range(T_FRAMES)}


# ---------------------------------------------------------------------------------------------
# 6. Time-Interval MLP


def test_token_intervals_video_layout():
    layout = TokenLayout(4, 2, 3, extras=1, per_frame_extras=True)  # 4 frames of CLS + 6 patches
    iv, is_patch = token_intervals(layout, groups=7)  # groups do not matter for t > 1
    assert iv.shape == (28, 2) and is_patch.shape == (28,)
    for t in range(4):
        frame = list(range(t * 7, (t + 1) * 7))
        assert not is_patch[frame[0]] and is_patch[frame[1:]].all()
        assert iv[frame[0]].tolist() == [0.0, 0.0]
        for p in frame[1:]:
            assert iv[p].tolist() == pytest.approx([t / 4, (t + 1) / 4])


def test_token_intervals_spectrogram_layout():
    layout = TokenLayout(1, 3, 10, extras=2, per_frame_extras=False)  # AST: CLS, dist, 3 rows x 10 columns
    iv, is_patch = token_intervals(layout, groups=4)
    group_of_column = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]  # floor(w * 4 / 10), by hand
    assert is_patch.tolist() == [False, False] + [True] * 30
    assert iv[:2].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    for f in range(3):
        for w in range(10):
            g = group_of_column[w]
            assert iv[2 + f * 10 + w].tolist() == pytest.approx([g / 4, (g + 1) / 4]), (f, w)
    # audio group g and video frame g of a 4-frame clip share an interval
    video_iv, _ = token_intervals(TokenLayout(4, 2, 2), groups=4)
    assert iv[2 + 5].tolist() == video_iv[2 * 4].tolist()  # column 5 -> group 2 -> frame 2


def test_time_interval_mlp_embeddings():
    torch.manual_seed(0)
    tim = TimeIntervalMLP(16, hidden=8, groups=4)
    randomise(tim)
    for layout in (TokenLayout(4, 2, 3, extras=1, per_frame_extras=True),
                   TokenLayout(1, 2, 10, extras=2, per_frame_extras=False), TokenLayout(4, 2, 2)):
        emb = tim(layout)
        assert emb.shape == (layout.length, 16)
        want = ref_time_embedding(layout, tim, groups=4)
        torch.testing.assert_close(emb.double(), want, atol=1e-6, rtol=0)
        extras = sorted(set(range(layout.length)) - patch_positions(layout))
        assert torch.equal(emb[extras], torch.zeros(len(extras), 16))
        assert (emb[sorted(patch_positions(layout))].abs().sum(-1) > 0).all()


def test_time_interval_mlp_default_size():
    """Linear(2, 128) -> GELU -> Linear(128, d): 49,920 parameters at d = 384 (the +0.6M of the CA²ST paper)."""
    assert sum(p.numel() for p in TimeIntervalMLP(384).parameters()) == 49_920


def test_bca_time_groups_follow_video_frames():
    op = make_op({"a2s": {"query": "spatial", "key": "audio", "window": "global"}}, position="time")
    assert op.time_embed is not None and op.time_embed.groups == T_FRAMES


# ---------------------------------------------------------------------------------------------
# 2. zero init: the fused model equals the frozen experts


VARIANTS = {
    "cast": [],
    "ratio-0.25": ["fusion.bca.ratio=0.25"],
    "ratio-1": ["fusion.bca.ratio=1.0"],
    "t2s-space": ["fusion.bca.directions.t2s.window=space"],
    "s2t-space-time": ["fusion.bca.directions.s2t.window=space-time"],
    "layers-list": ["fusion.bca.steps=[1,2]"],
    "layers-range": ["fusion.bca.steps='1:3'"],
    "full": ["fusion.bca.mode=full"],
    "full-adapter": ["fusion.bca.mode=full_adapter"],
    "position-none": ["fusion.bca.position=none"],
    "position-time": ["fusion.bca.position=time"],
    "identity": ["fusion.bca=null"],
    "drop-path": ["drop_path=0.2"],
}


def t2s_only_recipe() -> dict:
    r = cast_recipe()
    del r["fusion"]["bca"]["directions"]["s2t"]
    return r


def s2t_only_recipe() -> dict:
    r = cast_recipe()
    del r["fusion"]["bca"]["directions"]["t2s"]
    return r


RECIPES = {**{k: (cast_recipe, v) for k, v in VARIANTS.items()},
           "t2s-only": (t2s_only_recipe, []), "s2t-only": (s2t_only_recipe, []), "ca2st": (ca2st_recipe, [])}


@pytest.fixture(scope="module")
def built():
    cache: dict[str, torch.nn.Module] = {}

    def get(key: str):
        if key not in cache:
            recipe, overrides = RECIPES[key]
            torch.manual_seed(0)
            cache[key] = fusionkit.build(recipe(), overrides=overrides)
        return copy.deepcopy(cache[key])

    return get


@pytest.mark.parametrize("key", list(RECIPES))
def test_zero_init_equals_frozen_experts(built, key):
    model = built(key)
    batch = av_batch() if key == "ca2st" else video_batch()
    with torch.no_grad():
        fused = model.forward_tokens(batch)
        for e, expert in model.experts.items():
            alone = expert(batch[expert.modality])
            assert torch.equal(fused[e].x, alone.x), e
            assert fused[e].layout == alone.layout
        if key == "identity":
            return
        # a non-zero up-projection (or output projection / adapter when there is none) breaks equality
        op = bca_ops(model)[-1]
        if op.up is not None:
            target = op.up[sorted(op.up)[0]]
        elif op.adapter is not None:
            target = op.adapter[sorted(op.adapter)[0]].D_fc2
        else:
            target = next(iter(op.cross.values())).attn.proj
        target.weight.normal_(0, 0.5)
        model.eval()  # no stochastic depth dropping the whole update
        fused = model.forward_tokens(batch)
    differs = [e for e, expert in model.experts.items() if not torch.equal(fused[e].x, expert(batch[expert.modality]).x)]
    assert differs


# ---------------------------------------------------------------------------------------------
# 3. every ablation option builds by a one-line override and trains only trainable parameters


def expected_structure(key: str, model) -> None:
    ops = bca_ops(model)
    steps = sorted(int(s) for ops_ in model.fusions.values() for s in ops_)
    if key == "identity":
        assert len(model.fusions) == 0 and not ops
        return
    assert ops
    op = ops[0]
    dirs = {n: (q, k, w.name) for n, (q, k, w) in op.directions.items()}
    checks = {
        "cast": lambda: dirs == {"t2s": ("spatial", "temporal", "time"), "s2t": ("temporal", "spatial", "space")}
        and op.width == 32 and steps == [0, 1, 2],
        "ratio-0.25": lambda: op.width == 16,
        "ratio-1": lambda: op.width == 64,
        "t2s-space": lambda: dirs["t2s"][2] == "space" and dirs["s2t"][2] == "space",
        "s2t-space-time": lambda: dirs["s2t"][2] == "global" and dirs["t2s"][2] == "time",
        "layers-list": lambda: steps == [1, 2],
        "layers-range": lambda: steps == [1, 2],
        "full": lambda: op.mode == "full" and op.up is None and op.adapter is None and op.width == 64
        and all(isinstance(m, torch.nn.Identity) for m in op.down.values()),
        "full-adapter": lambda: op.mode == "full_adapter" and op.up is None and sorted(op.adapter) == ["spatial", "temporal"],
        "position-none": lambda: all(c.pos_q is None and c.pos_kv is None for c in op.cross.values())
        and op.time_embed is None,
        "position-time": lambda: all(c.pos_q is None for c in op.cross.values()) and op.time_embed is not None,
        "drop-path": lambda: isinstance(bca_ops(model)[-1].drop_path, torch.nn.Module)
        and bca_ops(model)[-1].drop_path.drop_prob == pytest.approx(0.2),
        "t2s-only": lambda: list(dirs) == ["t2s"] and sorted(op.up) == ["spatial"],
        "s2t-only": lambda: list(dirs) == ["s2t"] and sorted(op.up) == ["temporal"],
        "ca2st": lambda: len(dirs) == 6,
    }
    assert checks[key](), (key, dirs, op.width, steps)


@pytest.mark.parametrize("key", list(RECIPES))
def test_ablation_builds_and_trains_only_trainable(built, key):
    model = built(key)
    expected_structure(key, model)
    enliven(model)
    model.train()
    batch = av_batch() if key == "ca2st" else video_batch()
    tokens = model.forward_tokens(batch)
    g = torch.Generator().manual_seed(5)
    loss = sum((t.x * torch.randn(t.x.shape, generator=g)).sum() for t in tokens.values())
    feats = model.features(tokens)
    loss = loss + sum(h({e: feats[(e, m)] for e, m in h.inputs.items()}).square().sum() for h in model.heads.values())
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    bca_names = {n for n in trainable if n.startswith("fusions.")}
    if key != "identity":
        assert bca_names
        zero = [n for n, p in model.named_parameters() if n in bca_names and not p.grad.any()]
        assert not zero, zero
    # nothing of a frozen expert trains, apart from the adapters and the unfrozen norms
    for n in trainable:
        if n.startswith("experts."):
            assert "adapter" in n or ".pool_norm." in n, n


def test_single_direction_one_line_override():
    model = fusionkit.build(cast_recipe(), overrides=["fusion.bca.directions.s2t=null"])
    assert set(bca_ops(model)[0].directions) == {"t2s"}
    assert set(bca_ops(model)[0].up) == {"spatial"}


def test_layer_range_override_unquoted():
    model = fusionkit.build(cast_recipe(), overrides=["fusion.bca.steps=1:3"])
    assert sorted(int(s) for s in model.fusions["bca"]) == [1, 2]


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="unknown mode 'ful'.*bottleneck"):
        fusionkit.build(cast_recipe(), overrides=["fusion.bca.mode=ful"])
    with pytest.raises(ValueError, match="unknown position"):
        fusionkit.build(cast_recipe(), overrides=["fusion.bca.position=lerned"])
    with pytest.raises(ValueError, match="tme.*time"):
        fusionkit.build(cast_recipe(), overrides=["fusion.bca.directions.t2s.window=tme"])
    with pytest.raises(ValueError, match="windw"):
        fusionkit.build(cast_recipe(), overrides=["fusion.bca.directions.t2s.windw=time"])
    with pytest.raises(ValueError, match="not divisible by heads"):
        fusionkit.build(cast_recipe(), overrides=["fusion.bca.heads=5"])


# ---------------------------------------------------------------------------------------------
# 3/4. shared projections and parameter counts by formula


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() deduplicates shared tensors


def bottleneck_formula(D: dict[str, int], d: int, directions: dict, pos_lengths: dict[str, tuple[int, int]],
                       time_mlp: bool = False, hidden: int = 128) -> int:
    receivers = {spec["query"] for spec in directions.values()}
    down = sum(D[e] * d + d for e in D)
    ln = sum(2 * d for e in D)
    cross = sum(4 * d * d + 4 * d + d * sum(pos_lengths.get(name, (0, 0))) for name in directions)
    up = sum(d * D[e] + D[e] for e in receivers)
    tim = (2 * hidden + hidden + hidden * d + d) if time_mlp else 0
    return down + ln + cross + up + tim


def test_param_count_cast(built):
    model = built("cast")
    D = {"spatial": 64, "temporal": 64}
    d = 32
    # T2S (time): T = 4 query and 4 key positions; S2T (space): N = 9 and 9
    per_layer = bottleneck_formula(D, d, CAST_DIRECTIONS, {"t2s": (T_FRAMES, T_FRAMES), "s2t": (GRID ** 2, GRID ** 2)})
    assert per_layer == 2 * (64 * 32 + 32) + 2 * 64 + 2 * (4 * 32 * 32 + 4 * 32) + 32 * (8 + 18) + 2 * (32 * 64 + 64)
    ops = bca_ops(model)
    assert len(ops) == 3
    for op in ops:
        assert numel(op) == per_layer
    assert numel(model.fusions) == 3 * per_layer


@pytest.mark.parametrize("key, d, layers, positions, time_mlp", [
    ("ratio-0.25", 16, 3, "learned", False),
    ("ratio-1", 64, 3, "learned", False),
    ("layers-range", 32, 2, "learned", False),
    ("position-none", 32, 3, "none", False),
    ("position-time", 32, 3, "none", True),
    ("s2t-space-time", 32, 3, "s2t-global", False),
])
def test_param_count_variants(built, key, d, layers, positions, time_mlp):
    model = built(key)
    D = {"spatial": 64, "temporal": 64}
    pos_lengths = {"learned": {"t2s": (4, 4), "s2t": (9, 9)}, "none": {},
                   "s2t-global": {"t2s": (4, 4), "s2t": (36, 36)}}[positions]
    per_layer = bottleneck_formula(D, d, CAST_DIRECTIONS, pos_lengths, time_mlp)
    assert [numel(op) for op in bca_ops(model)] == [per_layer] * layers


def test_param_count_full_modes(built):
    D = 64
    pos = 2 * 4 * D + 2 * 9 * D
    full = bca_ops(built("full"))[0]
    assert numel(full) == 2 * 2 * D + 2 * (4 * D * D + 4 * D) + pos
    adapter = bca_ops(built("full-adapter"))[0]
    h = D // 4
    assert numel(adapter) == 2 * 2 * D + 2 * (4 * D * D + 4 * D) + pos + 2 * (D * h + h + h * D + D)


def test_ca2st_shared_projections_and_count(built):
    model = built("ca2st")
    D = {"audio": 48, "spatial": 64, "temporal": 64}
    d = 32
    for op in bca_ops(model):
        # one down / LN / up per expert, whatever the number of directions it takes part in
        assert sorted(op.down) == sorted(op.norm) == sorted(op.up) == ["audio", "spatial", "temporal"]
        assert len(op.cross) == 6
        assert [m.in_features for m in (op.down["audio"], op.down["spatial"], op.down["temporal"])] == [48, 64, 64]
        assert [op.up[e].out_features for e in ("audio", "spatial", "temporal")] == [48, 64, 64]
        n_linear = sum(isinstance(m, torch.nn.Linear) and m.in_features in (48, 64) and m.out_features == d
                       for m in op.modules())
        assert n_linear == 3
        # learned positions only for S&T; time embedding for the A directions
        assert {n for n, c in op.cross.items() if c.pos_q is not None} == {"t2s", "s2t"}
        assert op.time_embed is not None
        per_layer = bottleneck_formula(D, d, CA2ST_DIRECTIONS, {"t2s": (4, 4), "s2t": (9, 9)}, time_mlp=True)
        assert numel(op) == per_layer
    # both incoming directions of an expert reach the same up-projection: gradients of the shared
    # up-projection of the spatial expert see both a2s and t2s
    op = bca_ops(model)[0]
    enliven(model)
    state_x = {}

    def grab(_module, inputs, _output):
        state_x.update({e: v.detach() for e, v in inputs[0].x.items()})

    handle = op.register_forward_hook(grab)
    model.forward_tokens(av_batch())
    handle.remove()
    layouts = {"audio": AUDIO, "spatial": SPATIAL, "temporal": TEMPORAL}
    out = op(SiteState(state_x, layouts, {}, 0))
    out["spatial"].square().sum().backward()
    for name in ("a2s", "t2s"):
        assert op.cross[name].attn.qkv.weight.grad.abs().sum() > 0, name
    for name in ("s2a", "s2t", "a2t", "t2a"):  # their outputs go to other experts
        assert op.cross[name].attn.qkv.weight.grad is None, name
