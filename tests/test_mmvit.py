"""MM-ViT (the MM-ViT paper): streams, every attention step against brute-force masked attention, order,
parameter counts of Table 1, gradients.

Tiny model: a 48-wide, 2-layer ViT (8-pixel patches, 32² frames: a 4×4 grid) shared by four streams
(I-frame 3 channels with the clip's CLS, motion vectors 2, residuals 3, 12-d audio vectors) over 4
time steps. The references below know nothing of fusionkit's windows: a boolean mask over the
concatenated streams, computed from every token's (stream, t, row, col) tags, says which keys a patch
query sees; the CLS, replicated into several windows, gets one key set per window and averages.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn

from fusionkit.attention import TokenLayout, use_backend
from fusionkit.fusion.base import SiteState
from fusionkit.fusion.mmvit import MMViT
from fusionkit.recipes import RecipeError, build, build_from_config, load_recipe
from fusionkit.trainable import TrainablePolicy

B, T, GRID, DIM, AUDIO = 2, 4, 4, 48, 12
N = GRID * GRID
STREAMS = ("iframe", "motion", "residual", "audio")
PAPER = {"mmvit_i": 87.23e6, "mmvit_ii": 122.69e6, "mmvit_iii_merged": 158.14e6, "mmvit_iii_co": 158.14e6,
         "mmvit_iii_shift": 143.98e6, "mmvit_iv": 158.60e6}


def tiny_recipe(**op) -> dict:
    return {
        "inputs": {"iframe": [3, T, 32, 32], "motion": [2, T, 32, 32], "residual": [3, T, 32, 32],
                   "audio": [T, AUDIO]},
        "experts": {
            "iframe": {"type": "mmvit_vit", "name": "vit_base_patch16_224", "img_size": 32, "patch_size": 8,
                       "embed_dim": DIM, "depth": 2, "num_heads": 2, "modality": "iframe", "num_frames": T,
                       "frozen": False},
            "motion": {"type": "mmvit_stream", "expert": "iframe", "modality": "motion", "channels": 2,
                       "num_frames": T},
            "residual": {"type": "mmvit_stream", "expert": "iframe", "modality": "residual", "channels": 3,
                         "num_frames": T},
            "audio": {"type": "mmvit_stream", "expert": "iframe", "modality": "audio", "features": AUDIO,
                      "num_frames": T},
        },
        "fusion": {"mmvit": {"type": "mmvit", "experts": list(STREAMS), "heads": 2, **op}},
        "heads": {"action": {"type": "linear", "expert": "iframe", "classes": 5}},
    }


def tiny(**op):
    torch.manual_seed(0)
    return randomize(build_from_config(load_recipe(tiny_recipe(**op))))


def randomize(model):
    for name, p in model.named_parameters():  # zero-initialised FCs / convs would hide the maths
        if ".fc." in name or ".conv_" in name or name.endswith("time_embed"):
            with torch.no_grad():
                p.normal_(0, 0.2)
    return model


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"iframe": torch.randn(B, 3, T, 32, 32, generator=g), "motion": torch.randn(B, 2, T, 32, 32, generator=g),
            "residual": torch.randn(B, 3, T, 32, 32, generator=g), "audio": torch.randn(B, T, AUDIO, generator=g)}


def op_inputs(model, seed: int = 1):
    """Random stream tokens, their layouts and the (shared) first layer."""
    tokens = model.embed(batch())
    layouts = {e: t.layout for e, t in tokens.items()}
    g = torch.Generator().manual_seed(seed)
    x = {e: torch.randn(B, layouts[e].length, DIM, generator=g) for e in STREAMS}
    layers = {e: model.experts[e].layers[0] for e in STREAMS}
    return model.fusions.mmvit["0"], x, layouts, layers


# tags of the concatenated streams: stream s, frame t, row r, column c; the CLS (index 0) has t = -1 ----------

def tags() -> dict[str, torch.Tensor]:
    s, t, r, c = torch.meshgrid(torch.arange(len(STREAMS)), torch.arange(T), torch.arange(GRID), torch.arange(GRID),
                                indexing="ij")
    cls = torch.tensor([0, -1, -1, -1])
    return {k: torch.cat([cls[i:i + 1], v.reshape(-1)]) for i, (k, v) in enumerate(zip("strc", (s, t, r, c)))}


TAG = tags()
L = TAG["s"].numel()
IS_CLS = TAG["t"] < 0


def q_(k: str) -> torch.Tensor:  # query tag as a column
    return TAG[k][:, None]


def k_(k: str) -> torch.Tensor:  # key tag as a row
    return TAG[k][None, :]


def reference(qkv: nn.Linear, proj: nn.Linear, heads: int, h: torch.Tensor, see: torch.Tensor,
              cls_keys: list[torch.Tensor], post=None) -> torch.Tensor:
    """Eager softmax attention: patch query i over the keys ``see[i]`` (no key: zero output); the CLS over
    each key set of ``cls_keys`` in turn, outputs averaged (no set: zero output)."""
    d = h.shape[-1]
    hd = d // heads
    q, k, v = (t.reshape(B, L, heads, hd).transpose(1, 2) for t in F.linear(h, qkv.weight, qkv.bias).split(d, -1))
    post = post or (lambda o: o)

    def attend(qi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = (qi @ k.transpose(-1, -2) * hd ** -0.5).masked_fill(~mask, float("-inf"))
        o = (scores.softmax(-1).nan_to_num() @ v).transpose(1, 2).reshape(B, -1, d)
        return post(F.linear(o, proj.weight, proj.bias))

    see = see & ~IS_CLS[:, None]
    out = attend(q, see) * see.any(-1)[None, :, None]
    out[:, 0] = sum(attend(q[:, :, :1], keys[None])[:, 0] for keys in cls_keys) / len(cls_keys) if cls_keys else 0
    return out


def flat(x: dict) -> torch.Tensor:
    return torch.cat([x[e] for e in STREAMS], dim=1)


def check_step(step: str, see: torch.Tensor, cls_keys: list[torch.Tensor], **op) -> None:
    model = tiny(**op)
    mm, x, layouts, layers = op_inputs(model)
    if mm.variant == "IV":  # the convolutions are tested on their own
        with torch.no_grad():
            for axis in mm.convs:
                getattr(mm, f"conv_{axis}").weight.zero_()
                getattr(mm, f"conv_{axis}").bias.zero_()
    layer = layers["iframe"]
    if step in ("S", "J"):
        norm, attn, post = layer.norm1, layer.attn, None
    else:
        mod = mm.time if step == "T" else mm.modal
        norm, attn, post = mod.norm, mod.attn, mod.fc
    fn = {"J": mm.joint, "T": mm.temporal, "S": mm.spatial, "M": mm.cross_modal}[step]
    with use_backend("eager"):
        got = flat(fn(dict(x), layouts, layers)) - flat(x)
    want = reference(attn.qkv, attn.proj, attn.num_heads, norm(flat(x)), see, cls_keys, post)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


SAME_P = (q_("r") == k_("r")) & (q_("c") == k_("c"))
SAME_T = q_("t") == k_("t")
SAME_S = q_("s") == k_("s")
KEY_CLS = IS_CLS[None, :]
OWNER = (TAG["s"] == 0)[:, None]  # queries of the stream holding the CLS
AT_P = [(TAG["r"] == r) & (TAG["c"] == c) | IS_CLS for r in range(GRID) for c in range(GRID)]
AT_T = [(TAG["t"] == t) | IS_CLS for t in range(T)]
OWN = TAG["s"] == 0


def test_joint_attention_i_is_full_attention_over_all_streams():
    check_step("J", torch.ones(L, L, dtype=torch.bool), [torch.ones(L, dtype=torch.bool)], variant="I")


def test_time_ii_spans_time_and_all_modalities_at_a_location():
    check_step("T", SAME_P | KEY_CLS, AT_P, variant="II")


def test_space_ii_spans_space_and_all_modalities_in_a_frame():
    check_step("S", SAME_T | KEY_CLS, AT_T, variant="II")


def test_time_iii_stays_within_the_stream():
    check_step("T", SAME_S & SAME_P | KEY_CLS & OWNER, [m & OWN for m in AT_P])


def test_space_iii_uses_the_layer_attention_within_the_stream():
    check_step("S", SAME_S & SAME_T | KEY_CLS & OWNER, [m & OWN for m in AT_T])


def test_merged_attention_sees_all_modalities_at_its_point_and_leaves_cls():
    check_step("M", SAME_P & SAME_T, [], cross="merged")


def test_co_attention_sees_only_the_other_modalities():
    check_step("M", SAME_P & SAME_T & ~SAME_S, [], cross="co")


def test_iv_local_windows():
    frames, rows = T // 2, GRID // 2
    block_t = TAG["t"] // frames
    same_block_t = block_t[:, None] == block_t[None, :]
    check_step("T", SAME_S & SAME_P & same_block_t | KEY_CLS & OWNER,
               [m & OWN & (block_t == f) | IS_CLS for m in AT_P for f in range(T // frames)], variant="IV")
    block = TAG["r"] // rows * 2 + TAG["c"] // rows
    same_block = block[:, None] == block[None, :]
    check_step("S", SAME_S & SAME_T & same_block | KEY_CLS & OWNER,
               [m & OWN & (block == b) | IS_CLS for m in AT_T for b in range(4)], variant="IV")
    # TimeSformer's reading: the CLS neither attends nor is attended in the temporal step (zero update)
    check_step("T", SAME_S & SAME_P & same_block_t, [], variant="IV", time_extras=False)


def test_time_extras_false_leaves_the_cls_out_of_temporal_attention():
    check_step("T", SAME_S & SAME_P, [], time_extras=False)
    check_step("T", SAME_P, [], variant="II", time_extras=False)
    check_step("S", SAME_S & SAME_T | KEY_CLS & OWNER, [m & OWN for m in AT_T], time_extras=False)  # space keeps it


def mha(x: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """Eager multi-head self-attention ``(B', S, D) -> (B', S, D)`` with ``attn``'s fused qkv and projection."""
    q, k, v = rearrange(F.linear(x, attn.qkv.weight, attn.qkv.bias), "b s (three h e) -> three b h s e", three=3,
                        h=attn.num_heads)
    weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    return F.linear(rearrange(weights @ v, "b h s e -> b s (h e)"), attn.proj.weight, attn.proj.bias)


def timesformer_layer(x: torch.Tensor, layer: nn.Module, time: nn.Module) -> torch.Tensor:
    """TimeSformer's divided space-time layer (its official ``Block``, written out): ``(B, 1 + T·N, D)``.

    Temporal attention over the patches only (the CLS neither attends nor is attended), through the
    temporal FC; spatial attention per frame with the CLS replicated into every frame and its outputs
    averaged; then the MLP."""
    cls, p = x[:, :1], x[:, 1:]
    xt = rearrange(p, "b (t n) d -> (b n) t d", t=T)
    p = p + rearrange(time.fc(mha(time.norm(xt), time.attn)), "(b n) t d -> b (t n) d", b=B)
    xs = torch.cat([repeat(cls, "b 1 d -> (b t) 1 d", t=T), rearrange(p, "b (t n) d -> (b t) n d", t=T)], dim=1)
    res = mha(layer.norm1(xs), layer.attn)
    x = torch.cat([cls + reduce(res[:, :1], "(b t) 1 d -> b 1 d", "mean", t=T),
                   p + rearrange(res[:, 1:], "(b t) n d -> b (t n) d", t=T)], dim=1)
    return x + layer.mlp(layer.norm2(x))


@pytest.mark.parametrize("time_extras", [False, True])
def test_one_stream_ii_is_timesformer_divided_attention(time_extras):
    """One ``mmvit_vit`` stream with variant II = TimeSformer's divided space-time attention exactly when
    ``time_extras=False``; the old behaviour (CLS in every temporal window) differs from it."""
    recipe = {"inputs": {"video": [3, T, 32, 32]},
              "experts": {"video": {"type": "mmvit_vit", "name": "vit_base_patch16_224", "img_size": 32,
                                    "patch_size": 8, "embed_dim": DIM, "depth": 2, "num_heads": 2, "num_frames": T,
                                    "frozen": False}},
              "fusion": {"mmvit": {"type": "mmvit", "experts": ["video"], "variant": "II", "heads": 2,
                                   "time_extras": time_extras}},
              "heads": {"action": {"type": "linear", "expert": "video", "pool": "cls", "classes": 5}}}
    torch.manual_seed(0)
    model = randomize(build_from_config(load_recipe(recipe))).eval()
    video = batch()["iframe"]
    with use_backend("eager"):
        got = model.forward_tokens({"video": video})["video"].x
    expert = model.experts["video"]
    want = model.embed({"video": video})["video"].x
    for i, layer in enumerate(expert.layers):
        want = timesformer_layer(want, layer, model.fusions.mmvit[str(i)].time)
    want = expert.final_norm(want)
    if time_extras:
        assert not torch.allclose(got, want, atol=1e-3)
    else:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_shift_merge_exchanges_value_chunks_by_hand():
    model = tiny(cross="shift")
    mm, x, layouts, layers = op_inputs(model)
    got = mm.cross_modal(dict(x), layouts, layers)
    m = mm.modal
    v = [m.v(m.norm(x[e][:, 1:] if e == "iframe" else x[e])) for e in STREAMS]  # (B, T·N, D) patches
    c = DIM // len(STREAMS)
    for k, e in enumerate(STREAMS):
        r = torch.cat([v[s][..., k * c:(k + 1) * c] for s in range(len(STREAMS))], dim=-1) + v[k]
        want = (x[e][:, 1:] if e == "iframe" else x[e]) + m.fc(m.proj(r))
        torch.testing.assert_close(got[e][:, 1:] if e == "iframe" else got[e], want)
    torch.testing.assert_close(got["iframe"][:, :1], x["iframe"][:, :1])  # the CLS has no (p, t)
    assert not hasattr(m, "qkv") and sum(p.numel() for p in m.parameters()) == 3 * (DIM * DIM + DIM) + 2 * DIM


def test_iv_convolutions_by_hand():
    model = tiny(variant="IV", convs=["time", "space"])
    mm, x, layouts, _ = op_inputs(model)
    frames, rows = mm.frames, mm.rows
    assert (frames, rows, mm.cols) == (T // 2, GRID // 2, GRID // 2)
    for axis in ("time", "space"):
        got = mm._conv(dict(x), layouts, axis)
        for e in ("iframe", "audio"):
            off = 1 if e == "iframe" else 0
            p = x[e][:, off:].reshape(B, T, GRID, GRID, DIM)
            want = p.clone()
            if axis == "time":
                w, bias, left = mm.conv_time.weight[:, 0], mm.conv_time.bias, (frames - 1) // 2
                for t in range(T):
                    acc = bias.expand(B, GRID, GRID, DIM).clone()
                    for j in range(frames):
                        if 0 <= t + j - left < T:
                            acc = acc + w[:, j] * p[:, t + j - left]
                    want[:, t] += acc
            else:
                w, bias, left = mm.conv_space.weight[:, 0], mm.conv_space.bias, (rows - 1) // 2
                for r, c in itertools.product(range(GRID), range(GRID)):
                    acc = bias.expand(B, T, DIM).clone()
                    for i, j in itertools.product(range(rows), range(rows)):
                        if 0 <= r + i - left < GRID and 0 <= c + j - left < GRID:
                            acc = acc + w[:, i, j] * p[:, :, r + i - left, c + j - left]
                    want[:, :, r, c] += acc
            torch.testing.assert_close(got[e][:, off:], want.reshape(B, T * N, DIM), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[e][:, :off], x[e][:, :off])


class Calls:
    def __init__(self, modules: dict) -> None:
        self.seen: list[str] = []
        for label, m in modules.items():
            m.register_forward_hook(lambda *_, label=label: self.seen.append(label))

    def order(self) -> str:
        return "".join(k for k, _ in itertools.groupby(self.seen))


@pytest.mark.parametrize("variant,order", [("III", "TMS"), ("III", "SMT"), ("III", "MTS"), ("II", "ST"), ("IV", "STM")])
def test_attention_order_option_orders_the_steps(variant, order):
    outs = []
    for o in (order, order[::-1]):
        model = tiny(variant=variant, order=o)
        mm, x, layouts, layers = op_inputs(model)
        watched = {"T": mm.time, "S": layers["iframe"].attn}
        if variant != "II":
            watched["M"] = mm.modal
        calls = Calls(watched)
        outs.append(flat(mm(SiteState(dict(x), layouts, layers, 0))))
        assert calls.order() == o
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)  # the order changes the result


@pytest.mark.parametrize("op", [{"variant": "I"}, {"variant": "II"}, {"cross": "merged"}, {"cross": "co"},
                                {"cross": "shift"}, {"variant": "IV"}])
def test_forward_backward_gradients_exactly_on_the_trainable_set(op):
    torch.manual_seed(0)
    recipe = tiny_recipe(**op)
    recipe["heads"]["aux"] = {"type": "linear", "expert": "audio", "pool": "avg", "classes": 3}  # patches reach it
    model = randomize(build_from_config(load_recipe(recipe)))
    TrainablePolicy(freeze=["experts.motion.patch_embed.*", "experts.iframe.vit.blocks.1.mlp.*"]).apply(model)
    out = model(batch())
    assert out["action"].shape == (B, 5) and out["aux"].shape == (B, 3)
    (out["action"].square().mean() + out["aux"].square().mean()).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        if p.requires_grad:
            assert torch.isfinite(p.grad).all(), name
    ops = {n: p for n, p in model.named_parameters() if n.startswith("fusions.")}
    assert all(p.grad.abs().sum() > 0 for n, p in ops.items() if ".fc." in n or ".conv_" in n)
    assert (op.get("variant") == "I") == (not ops)
    # every stream's own embedding trains (except the frozen one), through the shared layers
    for name in ("experts.residual.patch_embed.weight", "experts.audio.proj.weight", "experts.iframe.time_embed"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_streams_embed_by_hand():
    model = tiny()
    data = batch()
    tok = model.embed(data)
    vit = model.experts["iframe"].vit
    lay = tok["iframe"].layout
    assert (lay.t, lay.h, lay.w, lay.extras, lay.per_frame_extras) == (T, GRID, GRID, 1, False)
    torch.testing.assert_close(tok["iframe"].x[:, 0], (vit.cls_token[0, 0] + vit.pos_embed[0, 0]).expand(B, DIM))
    for e, w, b in (("iframe", vit.patch_embed.proj.weight, vit.patch_embed.proj.bias),
                    ("motion", model.experts["motion"].patch_embed.weight, model.experts["motion"].patch_embed.bias)):
        clip = data[e]
        patches = clip.unfold(3, 8, 8).unfold(4, 8, 8)  # (B, C, T, 4, 4, 8, 8)
        emb = torch.einsum("bcthwij,dcij->bthwd", patches, w).reshape(B, T, N, DIM) + b
        pos = vit.pos_embed[0, 1:] if e == "iframe" else model.experts[e].pos_embed
        want = emb + pos + model.experts[e].time_embed[:, None]
        off = 1 if e == "iframe" else 0
        torch.testing.assert_close(tok[e].x[:, off:].reshape(B, T, N, DIM), want, atol=1e-5, rtol=1e-5)
    audio = model.experts["audio"]
    want = (audio.proj(data["audio"]) + audio.time_embed)[:, :, None].expand(B, T, N, DIM)
    torch.testing.assert_close(tok["audio"].x.reshape(B, T, N, DIM), want)  # replicated over the N positions
    assert tok["audio"].layout.extras == 0
    # the streams borrow the owner's layers: one set of transformer weights
    assert model.experts["audio"].layers is model.experts["iframe"].layers


def test_two_transformer_experts_default_options():
    vit = {"type": "timm_vit", "name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2,
           "embed_dim": 32, "num_heads": 2}
    recipe = {"inputs": {"video": [3, 4, 32, 32]}, "experts": {"a": vit, "b": dict(vit)},
              "fusion": {"x": {"type": "mmvit", "experts": ["a", "b"]}},
              "heads": {"y": {"type": "sum", "experts": ["a", "b"], "classes": 3}}}
    model = build_from_config(load_recipe(recipe))
    op = model.fusions.x["0"]
    assert (op.variant, op.cross, op.order) == ("III", "merged", "TMS")
    video = torch.randn(B, 3, 4, 32, 32)
    base = model({"video": video})["y"]
    with torch.no_grad():
        op.modal.fc.weight.normal_(0, 0.5)
    assert not torch.allclose(model({"video": video})["y"], base)  # the cross-modal step exchanges a <-> b
    bad = build_from_config(load_recipe(recipe, ["fusion.x.variant=II"]))
    with pytest.raises(ValueError, match="must share their layers"):
        bad({"video": video})


@pytest.mark.parametrize("override,message", [
    ("fusion.mmvit.variant=V", "unknown variant 'V'"),
    ("fusion.mmvit.order=TMM", "permutation of 'TMS'"),
    ("fusion.mmvit.cross=sum", "unknown cross 'sum'"),
    ("fusion.mmvit.window_frames=2", "variant IV only"),
    ("fusion.mmvit.convs=[space]", "variant IV only"),
])
def test_option_errors(override, message):
    assert tiny(order="T=>M=>S").fusions.mmvit["0"].order == "TMS"
    with pytest.raises(RecipeError, match=message):
        build_from_config(load_recipe(tiny_recipe(), [override]))
    with pytest.raises(RecipeError, match="variants III and IV only"):
        build_from_config(load_recipe(tiny_recipe(variant="II", cross="co")))
    with pytest.raises(RecipeError, match="time_extras applies to the temporal step"):
        build_from_config(load_recipe(tiny_recipe(variant="I", time_extras=False)))
    with pytest.raises(RecipeError, match="convs must list distinct axes"):
        build_from_config(load_recipe(tiny_recipe(variant="IV", convs=["space", "depth"])))


def op_params(variant: str, cross: str | None = None, **options) -> int:
    layout = {e: TokenLayout(8, 14, 14, 1 if e == "iframe" else 0) for e in STREAMS}
    op = MMViT(experts=list(STREAMS), dims={e: 768 for e in STREAMS}, layouts=layout, variant=variant, cross=cross,
               **options)
    return sum(p.numel() for p in op.parameters())


def test_table1_parameter_deltas_at_vit_base():
    """Per layer at d = 768 (×12): I→II and II→III each +35.4M, shift-merge −14.16M, IV +0.46M."""
    count = {v: 12 * op_params(*v) for v in [("I",), ("II",), ("III", "merged"), ("III", "co"), ("III", "shift"),
                                              ("IV", "merged")]}
    assert count[("I",)] == 0
    d = 768
    assert count[("II",)] == 12 * (5 * (d * d + d) + 2 * d)  # W_Q, W_K, W_V, projection, FC (+ biases, LN)
    assert count[("III", "merged")] == count[("III", "co")] == 2 * count[("II",)]
    assert count[("III", "merged")] - count[("III", "shift")] == 12 * 2 * (d * d + d)  # no W_Q, W_K
    assert abs((count[("II",)] - 0) - (PAPER["mmvit_ii"] - PAPER["mmvit_i"])) < 0.1e6
    assert abs(count[("III", "merged")] - count[("II",)] - (PAPER["mmvit_iii_merged"] - PAPER["mmvit_ii"])) < 0.1e6
    assert abs(count[("III", "merged")] - count[("III", "shift")] - 14.16e6) < 0.1e6
    assert abs(count[("IV", "merged")] - count[("III", "merged")] - 0.46e6) < 0.1e6


def test_iv_default_is_the_papers_one_depthwise_spatial_convolution():
    """Table 1: IV − III = 0.46M: one depthwise 7×7 convolution with bias per layer, 12·768·50 = 460,800;
    the two-convolution form (7×7 after space, 4 after time) is an option (506,880)."""
    d = 768
    iii = 12 * op_params("III", "merged")
    assert 12 * op_params("IV", "merged") - iii == 12 * d * (7 * 7 + 1) == 460_800
    assert 12 * op_params("IV", "merged", convs=["time", "space"]) - iii == 12 * d * (7 * 7 + 1 + 4 + 1) == 506_880
    assert 12 * op_params("IV", "merged", convs=[]) == iii


def test_full_size_mmvit_iii_merged_matches_table1():
    model = build("mmvit_iii_merged")
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - PAPER["mmvit_iii_merged"]) / PAPER["mmvit_iii_merged"] < 0.005
    assert all(p.requires_grad for p in model.parameters())  # MM-ViT fine-tunes everything


@pytest.mark.slow  # two ViT-B builds, 3-6 s each on 2 cores
def test_full_size_mmvit_iv_adds_exactly_the_papers_convolution():
    models = {r: build(r) for r in ("mmvit_iii_merged", "mmvit_iv")}
    total = {r: sum(p.numel() for p in m.parameters()) for r, m in models.items()}
    assert total["mmvit_iv"] - total["mmvit_iii_merged"] == 460_800  # paper: 158.60M − 158.14M
    conv = models["mmvit_iv"].fusions.mmvit["0"].conv_space
    assert (conv.weight.shape, conv.groups) == ((768, 1, 7, 7), 768) and conv.bias is not None


@pytest.mark.slow  # each ViT-B build takes 3-6 s on 2 cores; III merged is built above without the mark
@pytest.mark.parametrize("recipe", sorted(set(PAPER) - {"mmvit_iii_merged"}))
def test_full_size_parameter_counts_match_table1(recipe):
    total = sum(p.numel() for p in build(recipe).parameters())
    assert abs(total - PAPER[recipe]) / PAPER[recipe] < 0.005, (recipe, total)
