"""AV-STFP: the ``avstfp`` operator and its recipes.

Tiny shared CLIP towers (64 wide, 4 heads, 2 layers, 2×2 patches + CLS per frame) with random
non-trivial weights. Every prompting stage is compared with an independent reference written here
with explicit loops over samples, locations / frames and heads, using the frozen weights directly
(prompts as full tokens whose outputs are computed and then thrown away, as in the paper's
equations). Full-size parameter counts are checked against paper Tables 1 and 4.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fusionkit.attention.multihead as multihead
import fusionkit.attention.multihead as multihead_module
from fusionkit.attention import TokenLayout
from fusionkit.describe import count_params
from fusionkit.fusion.avstfp import AVSTFP
from fusionkit.fusion.base import SiteState
from fusionkit.recipes import RecipeError, build
from fusionkit.registry import FUSIONS

TEXT = dict(context_length=4, vocab_size=16, width=16, heads=1, layers=1)
VISION = dict(width=64, layers=2, head_width=16, image_size=32, patch_size=16)
D, HEADS, S = 64, 4, 5  # width, heads, tokens per frame (CLS + 2×2 patches)
BATCH = 2


def tiny_recipe(frames: int = 3, chunks: int = 3, **op) -> dict:
    return {
        "inputs": {"video": [3, frames, 32, 32], "audio": [8000]},
        "experts": {
            "video": {"type": "clip_vit", "name": "ViT-B-16", "quick_gelu": True, "vision_cfg": VISION,
                      "text_cfg": TEXT, "embed_dim": 24},
            "audio": {"type": "shared", "expert": "video", "modality": "audio",
                      "frontend": {"type": "spectrogram_image", "chunks": chunks, "num_mel_bins": 32, "target_length": 16,
                                   "size": [32, 32]}},
        },
        "fusion": {"avstfp": {"type": "avstfp", "experts": ["audio", "video"], **op}},
        "heads": {"label": {"type": "mlp", "experts": ["audio", "video"], "classes": 5, "hidden": 8}},
    }


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Move every parameter (frozen tower, LN weights, prompts, β) well off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("fusions."):
                if p.dim() == 0:  # β
                    p.copy_(0.5 + torch.rand((), generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def tiny_model(overrides=(), seed: int = 0, frames: int = 3, chunks: int = 3, **op) -> nn.Module:
    model = build(tiny_recipe(frames, chunks, **op), overrides)
    randomize(model, seed)
    return model.eval()


def batch(frames: int = 3, seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.randn(BATCH, 3, frames, 32, 32, generator=g),
            "audio": torch.randn(BATCH, 8000, generator=g) * 0.1}


def tokens(t: int, seed: int) -> Tensor:
    return torch.randn(BATCH, t * S, D, generator=torch.Generator().manual_seed(seed))


def layout(t: int) -> TokenLayout:
    return TokenLayout(t, 2, 2, extras=1, per_frame_extras=True)


# -- independent reference -------------------------------------------------------------------------

def ln(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def ref_mhsa(attn: nn.Module, xq: Tensor, xk: Tensor, xv: Tensor) -> Tensor:
    """Frozen MHSA with explicit heads: queries ``xq`` ``(Sq, D)``, key tokens ``xk``, value tokens ``xv``."""
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = xq @ w[:D].T + b[:D], xk @ w[D:2 * D].T + b[D:2 * D], xv @ w[2 * D:].T + b[2 * D:]
    hd = D // HEADS
    outs = []
    for h in range(HEADS):
        sl = slice(h * hd, (h + 1) * hd)
        a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hd), dim=-1)
        outs.append(a @ v[:, sl])
    return torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias


def ref_self(attn: nn.Module, seq: Tensor, keep: int) -> Tensor:
    """Self-attention over the whole sequence (prompts included); the first ``keep`` outputs."""
    return ref_mhsa(attn, seq, seq, seq)[:keep]


def ref_temporal(x: Tensor, t: int, block: nn.Module, pk: Tensor, pv: Tensor, beta: Tensor) -> Tensor:
    """Eq. 1: per location (CLS included) across the t frames; prompts appended to K and V only."""
    x4 = x.reshape(BATCH, t, S, D)
    out = torch.zeros_like(x4)
    for b in range(BATCH):
        for s in range(S):
            seq = ln(x4[b, :, s], block.norm1)  # (t, D)
            out[b, :, s] = ref_mhsa(block.attn, seq, torch.cat([seq, pk]), torch.cat([seq, pv]))
    return (x4 + beta * out).reshape(x.shape)


def ref_spatial(x: Tensor, t: int, block: nn.Module, prompts: Tensor | None, prompt_norm: bool = True) -> Tensor:
    """Eq. 3-4: per frame, [A_s, P] through LN and MHSA; the prompts' outputs Z are dropped."""
    x4 = x.reshape(BATCH, t, S, D)
    out = torch.zeros_like(x4)
    for b in range(BATCH):
        for f in range(t):
            seq = x4[b, f]
            if prompts is not None:
                p = ln(prompts, block.norm1) if prompt_norm else prompts
                out[b, f] = ref_self(block.attn, torch.cat([ln(seq, block.norm1), p]), S)
            else:
                out[b, f] = ref_self(block.attn, ln(seq, block.norm1), S)
    return (x4 + out).reshape(x.shape)


def ref_fusion(xa: Tensor, xv: Tensor, ta: int, tv: int, block: nn.Module, pf: Tensor, beta: Tensor,
               per_frame: bool = True) -> tuple[Tensor, Tensor]:
    """Eq. 5: [A, P_f, V] through LN and MHSA per frame (or whole clip); the prompts' outputs dropped."""
    oa, ov = torch.zeros_like(xa), torch.zeros_like(xv)
    nf = pf.shape[0]
    p = ln(pf, block.norm1)
    for b in range(BATCH):
        if per_frame:
            a4, v4 = xa[b].reshape(ta, S, D), xv[b].reshape(tv, S, D)
            for f in range(ta):
                seq = torch.cat([ln(a4[f], block.norm1), p, ln(v4[f], block.norm1)])
                y = ref_mhsa(block.attn, seq, seq, seq)
                oa[b, f * S:(f + 1) * S] = y[:S]
                ov[b, f * S:(f + 1) * S] = y[S + nf:]
        else:
            seq = torch.cat([ln(xa[b], block.norm1), p, ln(xv[b], block.norm1)])
            y = ref_mhsa(block.attn, seq, seq, seq)
            la = xa.shape[1]
            oa[b], ov[b] = y[:la], y[la + nf:]
    return xa + beta * oa, xv + beta * ov


def op_and_block(model: nn.Module, step: int = 0) -> tuple[AVSTFP, nn.Module]:
    block = model.experts.video.layers[step]
    assert isinstance(block.ls1, nn.Identity)  # CLIP: no layer scale, so the references leave it out
    return model.fusions.avstfp[str(step)], block


# -- 1. each stage against the reference ------------------------------------------------------------

def test_temporal_stage_matches_reference():
    model = tiny_model(stages="T")
    op, block = op_and_block(model)
    x = tokens(3, 5)
    with torch.no_grad():
        got = op.temporal(x, layout(3), block, "audio")
        want = ref_temporal(x, 3, block, op.temporal_key["audio"], op.temporal_value["audio"],
                            op.beta_temporal["audio"])
    assert (got - x).abs().mean() > 0.05  # non-trivial update
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # key and value prompts are distinct: swapping them changes the result
    with torch.no_grad():
        swapped = ref_temporal(x, 3, block, op.temporal_value["audio"], op.temporal_key["audio"],
                               op.beta_temporal["audio"])
    assert not torch.allclose(got, swapped, atol=1e-3)


def test_temporal_prompts_enter_keys_and_values_only(monkeypatch):
    """Stage 1: the kernel sees T queries per location and T + N_t keys / values."""
    model = tiny_model(stages="T", temporal_prompts=2)
    op, block = op_and_block(model)
    seen = []
    kernel = multihead_module.attention

    def spy(q, k, v, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return kernel(q, k, v, **kw)

    monkeypatch.setattr(multihead_module, "attention", spy)
    x = tokens(4, 6)
    with torch.no_grad():
        out = op.temporal(x, layout(4), block, "video")
    assert out.shape == x.shape
    hd = D // HEADS
    assert seen == [((BATCH * S, HEADS, 4, hd), (BATCH * S, HEADS, 6, hd), (BATCH * S, HEADS, 6, hd))]


@pytest.mark.parametrize("prompt_norm", [True, False])
def test_spatial_stage_matches_reference(prompt_norm):
    model = tiny_model(stages="S", prompt_norm=prompt_norm)
    op, block = op_and_block(model)
    x = tokens(3, 7)
    with torch.no_grad():
        got = op.spatial_step(x, layout(3), block, "video")
        want = ref_spatial(x, 3, block, op.spatial["video"], prompt_norm)
        plain = ref_spatial(x, 3, block, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the prompts matter


def test_spatial_stage_queries_are_the_tokens(monkeypatch):
    """The prompts' outputs are discarded, so only the S frame tokens are queries; keys S + N_s."""
    model = tiny_model(stages="S", spatial_prompts=10)
    op, block = op_and_block(model)
    seen = []
    kernel = multihead.attention
    monkeypatch.setattr(multihead, "attention",
                        lambda q, k, v, **kw: seen.append((q.shape[2], k.shape[2])) or kernel(q, k, v, **kw))
    x = tokens(3, 8)
    with torch.no_grad():
        assert op.spatial_step(x, layout(3), block, "audio").shape == x.shape
    assert seen == [(S, S + 10)]


@pytest.mark.parametrize("window", ["frame", "clip"])
def test_fusion_stage_matches_reference(window):
    model = tiny_model(stages="F", fusion_window=window)
    op, block = op_and_block(model)
    xa, xv = tokens(3, 9), tokens(3, 10)
    with torch.no_grad():
        ga, gv = op.fuse(xa, xv, layout(3), layout(3), block.norm1, block.norm1, block)
        wa, wv = ref_fusion(xa, xv, 3, 3, block, op.fusion, op.beta_fusion, per_frame=window == "frame")
        other = ref_fusion(xa, xv, 3, 3, block, op.fusion, op.beta_fusion, per_frame=window != "frame")
    torch.testing.assert_close(ga, wa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gv, wv, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ga, other[0], atol=1e-3)  # per frame and whole clip differ


def test_whole_clip_fusion_takes_unequal_frame_counts():
    model = tiny_model(stages="F", fusion_window="clip", frames=4, chunks=2)
    op, block = op_and_block(model)
    xa, xv = tokens(2, 11), tokens(4, 12)
    with torch.no_grad():
        ga, gv = op.fuse(xa, xv, layout(2), layout(4), block.norm1, block.norm1, block)
        wa, wv = ref_fusion(xa, xv, 2, 4, block, op.fusion, op.beta_fusion, per_frame=False)
    torch.testing.assert_close(ga, wa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gv, wv, atol=1e-5, rtol=1e-5)
    model(batch(frames=4))  # and the whole graph runs


def test_per_frame_fusion_needs_equal_frame_counts():
    with pytest.raises(RecipeError, match=r"per-frame fusion needs the same number of frames in both streams, "
                                          r"got audio: 2 and video: 4 .*fusion_window=clip"):
        build(tiny_recipe(frames=4, chunks=2))


@pytest.mark.slow
def test_whole_model_matches_reference():
    """The graph with the operator in every layer: T → S → F, then the shared FFN, final norm."""
    model = tiny_model()
    inputs = batch()
    with torch.no_grad():
        got = model.forward_tokens(inputs)
        xa = model.experts.audio.embed(inputs["audio"]).x
        xv = model.experts.video.embed(inputs["video"]).x
        for i, block in enumerate(model.experts.video.layers):
            op = model.fusions.avstfp[str(i)]
            xa = ref_temporal(xa, 3, block, op.temporal_key["audio"], op.temporal_value["audio"],
                              op.beta_temporal["audio"])
            xv = ref_temporal(xv, 3, block, op.temporal_key["video"], op.temporal_value["video"],
                              op.beta_temporal["video"])
            xa, xv = ref_spatial(xa, 3, block, op.spatial["audio"]), ref_spatial(xv, 3, block, op.spatial["video"])
            xa, xv = ref_fusion(xa, xv, 3, 3, block, op.fusion, op.beta_fusion)
            xa, xv = block.feed_forward(xa), block.feed_forward(xv)
    torch.testing.assert_close(got["audio"].x, xa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["video"].x, xv, atol=1e-5, rtol=1e-5)
    assert got["audio"].x.abs().mean() > 0.1


# -- 2. ablations by one-line override --------------------------------------------------------------

def prompt_params(stages: str, layers: int = 2, dim: int = D) -> int:
    """Table 4 formula: temporal 2·2·N_t·D (+2 β), spatial 2·N_s·D, fusion N_f·D (+1 β), per layer."""
    per = (2 * 2 * 2 * dim + 2) * ("T" in stages) + 2 * 10 * dim * ("S" in stages) + (2 * dim + 1) * ("F" in stages)
    return per * layers


HEAD = (2 * D * 8 + 8) + (8 * 5 + 5)


@pytest.mark.parametrize("stages", ["none", "T", "S", "F", "TS", "SF", "TF", "TSF"])
def test_stage_ablation_by_override(stages):
    model = build(tiny_recipe(), [f"fusion.avstfp.stages={stages}"])
    c = count_params(model)
    assert c["params_trainable"] == prompt_params(stages.replace("none", "")) + HEAD
    op = model.fusions.avstfp["0"]
    assert op.stages == stages.replace("none", "")
    assert bool(len(op.temporal_key)) == ("T" in stages) and bool(len(op.spatial)) == ("S" in stages)
    assert (op.fusion is not None) == ("F" in stages)
    model(batch())


def frozen_baseline(model: nn.Module) -> nn.Module:
    """The same tower (weights copied) with no operator: CLIP's own per-frame attention."""
    plain = build(tiny_recipe(), ["fusion.avstfp=null"]).eval()
    plain.experts.load_state_dict(model.experts.state_dict())
    plain.heads.load_state_dict(model.heads.state_dict())
    return plain


@pytest.mark.parametrize("override", [["fusion.avstfp.stages=none"],
                                      ["fusion.avstfp.beta_temporal=0", "fusion.avstfp.beta_fusion=0",
                                       "fusion.avstfp.spatial_prompts=0"]])
def test_no_prompting_is_the_frozen_tower(override):
    """stages=none (or β = 0 without spatial prompts) is the frozen image model on both streams."""
    model = build(tiny_recipe(), override).eval()
    with torch.no_grad():  # random tower, prompts and β as built (β stays as configured)
        for name, p in model.named_parameters():
            if not name.startswith("fusions."):
                p.add_(torch.randn_like(p) * 0.1)
    plain = frozen_baseline(model)
    inputs = batch()
    with torch.no_grad():
        got, want = model.forward_tokens(inputs), plain.forward_tokens(inputs)
    for e in ("audio", "video"):
        torch.testing.assert_close(got[e].x, want[e].x, atol=1e-5, rtol=1e-5)
    # and the default prompting does change the tokens
    full = tiny_model()
    full.experts.load_state_dict(model.experts.state_dict())
    with torch.no_grad():
        assert not torch.allclose(full.forward_tokens(inputs)["video"].x, want["video"].x, atol=1e-3)


def test_prompt_counts_and_beta_options():
    model = build(tiny_recipe(), ["fusion.avstfp.temporal_prompts=3", "fusion.avstfp.spatial_prompts=4",
                                  "fusion.avstfp.fusion_prompts=1", "fusion.avstfp.beta_temporal=0.25",
                                  "fusion.avstfp.beta_fusion=0.5"])
    op = model.fusions.avstfp["1"]
    assert op.temporal_key["audio"].shape == op.temporal_value["video"].shape == (3, D)
    assert op.spatial["video"].shape == (4, D) and op.fusion.shape == (1, D)
    assert op.beta_temporal["video"].item() == 0.25 and op.beta_fusion.item() == 0.5
    assert count_params(model)["params_trainable"] == 2 * (2 * 2 * 3 * D + 2 + 2 * 4 * D + D + 1) + HEAD


def test_bad_options_fail_clearly():
    with pytest.raises(RecipeError, match=r"stages must be a subset of 'TSF'"):
        build(tiny_recipe(), ["fusion.avstfp.stages=TX"])
    with pytest.raises(RecipeError, match=r"unknown fusion_window 'frames'; valid: frame, clip"):
        build(tiny_recipe(), ["fusion.avstfp.fusion_window=frames"])
    with pytest.raises(RecipeError, match=r"spatial_prompts must be a non-negative int"):
        build(tiny_recipe(), ["fusion.avstfp.spatial_prompts=-1"])


# -- 3. trainable set and the shared tower ----------------------------------------------------------

def test_gradients_exactly_on_trainable_set():
    model = build(tiny_recipe())  # default init (β = 0.1, prompts std 0.02): every prompt must get a gradient
    model.train()
    logits = model(batch())["label"]
    model.heads["label"].loss(logits, torch.tensor([1, 3])).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(("fusions.", "heads."))}
    assert trainable == expected
    assert any(".beta_" in n for n in trainable) and any(".temporal_value." in n for n in trainable)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_shared_tower_is_one_set_of_weights():
    model = tiny_model()
    assert model.experts.audio.layers is model.experts.video.layers
    assert not [k for k in model.state_dict() if k.startswith("experts.audio.")]
    video_params = sum(p.numel() for p in model.experts.video.parameters())
    experts = sum(p.numel() for p in model.experts.parameters())
    assert experts == video_params
    # both streams reach the same frozen weights: unfreeze one and see gradients from the audio stream alone
    qkv = model.experts.video.layers[1].attn.qkv.weight
    qkv.requires_grad_(True)
    inputs = batch()
    tokens_out = model.forward_tokens(inputs)
    tokens_out["audio"].x.sum().backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0


def test_builds_in_a_generic_two_expert_graph():
    """Default options and only ``experts: [a, b]``: two different 64-wide per-frame ViTs."""
    vit = {"type": "timm_vit", "name": "vit_tiny_patch16_224", "img_size": 32, "depth": 2, "embed_dim": 64,
           "num_heads": 4, "frame_select": {"stride": 2, "offset": 1}}
    recipe = {"inputs": {"video": [3, 8, 32, 32]}, "experts": {"a": vit, "b": dict(vit)},
              "fusion": {"avstfp": {"type": "avstfp", "experts": ["a", "b"]}},
              "heads": {"label": {"type": "concat", "experts": ["a", "b"], "classes": 3}}}
    model = build(recipe)
    assert FUSIONS.get("avstfp") is AVSTFP and AVSTFP.site == "replace_attn"
    out = model({"video": torch.randn(BATCH, 3, 8, 32, 32)})["label"]
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("fusions."))
    assert count_params(model)["params"]["operators"]["avstfp"]["total"] == prompt_params("TSF")


def test_operator_refuses_a_layer_without_attention():
    op = AVSTFP(experts=["a", "b"], dims={"a": D, "b": D}, layouts={"a": layout(2), "b": layout(2)})
    state = SiteState({"a": tokens(2, 0), "b": tokens(2, 1)}, {"a": layout(2), "b": layout(2)},
                      {"a": nn.Identity(), "b": nn.Identity()}, 0)
    with pytest.raises(ValueError, match=r"expert 'a' layer is a Identity, not a transformer Block"):
        op(state)


# -- 4. full-size parameter counts (paper Tables 1 and 4) --------------------------------------------

PAPER = {"avstfp_vitb16": (1.1e6, 87.1e6), "avstfp_vitl14": (1.82e6, 303.4e6)}
MEASURED = {"avstfp_vitb16": (1_078_337, 86_877_761), "avstfp_vitl14": (1_801_317, 304_981_093)}


@pytest.mark.parametrize("recipe", list(PAPER))
def test_full_size_parameter_counts(recipe):
    model = build(recipe)
    c = count_params(model)
    assert (c["params_trainable"], c["params_total"]) == MEASURED[recipe]
    trainable, total = PAPER[recipe]
    assert abs(c["params_trainable"] / trainable - 1) < 0.05
    assert abs(c["params_total"] / total - 1) < 0.01
    width, depth = (768, 12) if recipe.endswith("b16") else (1024, 24)
    ops = c["params"]["operators"]["avstfp"]["trainable"]
    assert ops == prompt_params("TSF", depth, width)  # 2·2·2·D + 2·10·D + 2·D (+3 β) per layer
    assert c["params"]["experts"]["audio"]["total"] == 0  # the audio stream borrows the video tower


TABLE4 = {"none": 1.09e6, "T": 1.28e6, "S": 1.58e6, "F": 1.14e6, "TS": 1.78e6, "SF": 1.63e6, "TF": 1.33e6,
          "TSF": 1.82e6}


def test_table4_ablation_counts_vit_l14():
    """Trainable parameters of every Table 4 variant (ViT-L/14: 24 layers of width 1024, 16×16 patches
    and 10 frames per stream) within 5 %: the 24 operators as the graph builds them, plus the head of
    the full-size build above (1,063,965)."""
    grid = TokenLayout(10, 16, 16, extras=1, per_frame_extras=True)
    for stages, paper in TABLE4.items():
        ops = [AVSTFP(experts=["audio", "video"], dims={"audio": 1024, "video": 1024},
                      layouts={"audio": grid, "video": grid}, stages=stages)
               for _ in range(24)]
        trainable = 1_063_965 + sum(p.numel() for op in ops for p in op.parameters())
        assert trainable == 1_063_965 + prompt_params(stages.replace("none", ""), 24, 1024)
        assert abs(trainable / paper - 1) < 0.05, stages


def test_layer_scale_and_drop_path_apply_to_every_stage():
    """A zero layer scale silences all three attention passes (the graph then runs only the FFN);
    the operator's own stochastic depth follows the graph's rate."""
    model = tiny_model()

    class Zero(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * 0.0

    for block in model.experts.video.layers:
        block.ls1 = Zero()
    inputs = batch()
    with torch.no_grad():
        got = model.forward_tokens(inputs)
        x = model.experts.video.embed(inputs["video"]).x
        for block in model.experts.video.layers:
            x = block.feed_forward(x)
    torch.testing.assert_close(got["video"].x, model.experts.video.final_norm(x), atol=1e-6, rtol=1e-6)
    rates = build(tiny_recipe(), ["drop_path=0.3"]).fusions.avstfp
    assert isinstance(rates["0"].drop_path, nn.Identity) and rates["1"].drop_path.drop_prob == pytest.approx(0.3)
