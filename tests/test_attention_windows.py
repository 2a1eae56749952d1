"""Windows against brute-force references built from token coordinates.

The reference never calls ``TokenLayout.patch_index`` / ``extra_index`` or any window code: it
derives what every stored token is from the storage orders described in ``layout.py`` and decides
window membership from the rules in ``windows.py``'s docstring.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fusionkit.attention import Attention, Global, Local, Ragged, Space, Time, TokenLayout, use_backend, windowed

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (xformers has no CPU kernel)")

DEVICE_BACKENDS = [
    pytest.param("cpu", "eager", id="cpu-eager"),
    pytest.param("cpu", "sdpa", id="cpu-sdpa"),
    pytest.param("cuda", "sdpa", id="cuda-sdpa", marks=[pytest.mark.cuda, cuda]),
    pytest.param("cuda", "xformers", id="cuda-xformers", marks=[pytest.mark.cuda, cuda]),
]

ATOL = 1e-5
DIM, HEADS, BATCH = 16, 2, 2


@pytest.fixture(autouse=True)
def _setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUSIONKIT_ATTENTION", raising=False)
    if HAS_CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False


# ---------------------------------------------------------------------------------------------
# brute-force reference
# ---------------------------------------------------------------------------------------------


def describe_tokens(t: int, h: int, w: int, extras: int, per_frame: bool) -> list[tuple]:
    """What each stored token is, in storage order, from layout.py's description:

    per frame: ``[e_0 .. e_{E-1}, p_(0,0) .. p_(H-1,W-1)]`` for frame 0, then frame 1, ...
    per clip:  ``[e_0 .. e_{E-1}, p_(t=0,0,0) .. p_(t=T-1,H-1,W-1)]`` (patches frame-major)
    """
    tokens: list[tuple] = []
    if per_frame and extras:
        for ti in range(t):
            tokens += [("frame_extra", e, ti) for e in range(extras)]
            tokens += [("patch", ti, hi, wi) for hi in range(h) for wi in range(w)]
    else:
        tokens += [("clip_extra", e) for e in range(extras)]
        tokens += [("patch", ti, hi, wi) for ti in range(t) for hi in range(h) for wi in range(w)]
    return tokens


def memberships(layout: TokenLayout, spec: tuple, extras: bool = True) -> list[set]:
    """For every stored token, the set of window ids it belongs to (empty: left out)."""
    T, H, W = layout.t, layout.h, layout.w
    tokens = describe_tokens(T, H, W, layout.extras, layout.per_frame_extras)
    assert len(tokens) == layout.length
    kind = spec[0]
    if kind == "ragged":
        bounds = [0]
        for n in spec[1]:
            bounds.append(bounds[-1] + n)
        return [{next(r for r in range(len(spec[1])) if bounds[r] <= pos < bounds[r + 1])}
                if extras or tok[0] == "patch" else set() for pos, tok in enumerate(tokens)]
    if kind == "local":
        ft, fh, fw = (min(v or full, full) for v, full in zip(spec[1:], (T, H, W), strict=True))
        nbh, nbw = math.ceil(H / fh), math.ceil(W / fw)
        all_blocks = {("blk", bt, bh, bw) for bt in range(math.ceil(T / ft)) for bh in range(nbh)
                      for bw in range(nbw)}
    out = []
    for tok in tokens:
        if tok[0] != "patch" and not extras:
            out.append(set())
            continue
        if kind == "global":
            out.append({"all"})
        elif kind == "space":
            if tok[0] == "patch":
                out.append({("frame", tok[1])})
            elif tok[0] == "frame_extra":  # a frame's own extras join its sequence
                out.append({("frame", tok[2])})
            else:  # extras per clip: replicated into every frame
                out.append({("frame", ti) for ti in range(T)})
        elif kind == "time":
            if tok[0] == "patch":
                out.append({("loc", tok[2], tok[3])})
            elif tok[0] == "frame_extra":  # extra e of every frame forms its own location
                out.append({("extra", tok[1])})
            else:  # extras per clip join every location
                out.append({("loc", hi, wi) for hi in range(H) for wi in range(W)})
        elif kind == "local":
            if tok[0] == "patch":
                out.append({("blk", tok[1] // ft, tok[2] // fh, tok[3] // fw)})
            elif tok[0] == "frame_extra":  # every block covering the frame
                out.append({("blk", tok[2] // ft, bh, bw) for bh in range(nbh) for bw in range(nbw)})
            else:
                out.append(set(all_blocks))
        else:
            raise AssertionError(kind)
    return out


def make_window(spec: tuple):
    kind = spec[0]
    if kind == "local":
        return Local(*spec[1:])
    if kind == "ragged":
        return Ragged(tuple(spec[1]))
    return {"global": Global, "space": Space, "time": Time}[kind]()


def _double(module: Attention) -> Attention:
    return copy.deepcopy(module).double()


def reference_masked(module, x, q_members, kv=None, k_members=None):
    """Case (a): every query token in at most one window. One full-length eager attention with an
    (Lq, Lk) bool mask: query i may attend key j when they share a window; left-out queries give 0."""
    k_members = q_members if k_members is None else k_members
    assert all(len(m) <= 1 for m in q_members)
    Lq, Lk = len(q_members), len(k_members)
    mask = torch.zeros(Lq, Lk, dtype=torch.bool)
    for i, mi in enumerate(q_members):
        for j, mj in enumerate(k_members):
            mask[i, j] = bool(mi & mj)
    keep = mask.any(dim=1)
    mask[~keep] = True  # left-out rows: any finite row, zeroed below
    with use_backend("eager"):
        y = module(x, kv=kv, bias=mask.to(x.device))
    return y * keep.to(y.dtype).to(y.device)[None, :, None]


def reference_loop(module, x, q_members, kv=None, k_members=None):
    """Case (b): loop over windows with explicit index lists; replicated outputs are averaged."""
    kv_src = x if kv is None else kv
    k_members = q_members if k_members is None else k_members
    ids = {m for ms in q_members for m in ms}
    out = torch.zeros(x.shape[0], x.shape[1], DIM, dtype=x.dtype, device=x.device)
    count = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    with use_backend("eager"):
        for wid in sorted(ids, key=repr):
            qi = [i for i, m in enumerate(q_members) if wid in m]
            ki = [j for j, m in enumerate(k_members) if wid in m]
            assert ki, f"window {wid} has no keys"
            y = module(x[:, qi], kv=kv_src[:, ki])
            out = out.index_add(1, torch.tensor(qi, device=x.device), y)
            count[qi] += 1
    return out / count.clamp(min=1)[None, :, None]


def run_and_compare(module, x, fn_windowed, fn_reference, kv=None):
    """Forward (fp32 vs float64 reference) and gradients w.r.t. inputs and parameters."""
    x1 = x.clone().requires_grad_()
    kv1 = None if kv is None else kv.clone().requires_grad_()
    module.zero_grad()
    y = fn_windowed(module, x1, kv1)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(99)).to(y.device)
    (y * g).sum().backward()

    ref_mod = _double(module)
    ref_mod.zero_grad()
    x2 = x.detach().double().requires_grad_()
    kv2 = None if kv is None else kv.detach().double().requires_grad_()
    ref = fn_reference(ref_mod, x2, kv2)
    (ref * g.double()).sum().backward()

    assert y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref.detach(), atol=ATOL, rtol=1e-5, msg=lambda m: f"forward: {m}")
    torch.testing.assert_close(x1.grad.double(), x2.grad, atol=ATOL, rtol=1e-5, msg=lambda m: f"grad x: {m}")
    if kv is not None:
        torch.testing.assert_close(kv1.grad.double(), kv2.grad, atol=ATOL, rtol=1e-5, msg=lambda m: f"grad kv: {m}")
    for (name, p), (_, p_ref) in zip(module.named_parameters(), ref_mod.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), p_ref.grad, atol=ATOL, rtol=1e-5,
                                   msg=lambda m, n=name: f"grad {n}: {m}")
    return y


def make_module(device, seed=0, qkv_bias=True, qk_norm=False) -> Attention:
    torch.manual_seed(seed)
    mod = Attention(DIM, HEADS, qkv_bias=qkv_bias, qk_norm=qk_norm).eval()
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return mod.to(device)


def tokens(layout: TokenLayout, device, seed=1, batch=BATCH):
    return torch.randn(batch, layout.length, DIM, generator=torch.Generator().manual_seed(seed)).to(device)


# ---------------------------------------------------------------------------------------------
# self-attention windows
# ---------------------------------------------------------------------------------------------

T_, H_, W_ = 3, 3, 4
LAYOUTS = {
    "no-extras": TokenLayout(T_, H_, W_),
    "frame-E1": TokenLayout(T_, H_, W_, 1, True),
    "frame-E2": TokenLayout(T_, H_, W_, 2, True),
    "clip-E2": TokenLayout(T_, H_, W_, 2, False),
}


def _ragged_uneven(L):
    return (5, L - 12, 7)


def _ragged_halves(L):
    return (L // 2, L - L // 2)


WINDOWS = {
    "global": lambda L: ("global",),
    "space": lambda L: ("space",),
    "time": lambda L: ("time",),
    "local-divisible": lambda L: ("local", 3, 1, 2),  # 3x1x2 blocks, uniform
    "local-frame": lambda L: ("local", 1, None, None),  # whole frames: per-frame extras in one block
    "local-ragged": lambda L: ("local", 2, 2, 3),  # edge blocks smaller in t, h and w
    "local-rows": lambda L: ("local", None, 2, None),  # ragged along rows only
    "ragged": lambda L: ("ragged", _ragged_uneven(L)),
    "ragged-halves": lambda L: ("ragged", _ragged_halves(L)),
    "ragged-single": lambda L: ("ragged", (1, L - 1)),
}


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("window_name", list(WINDOWS))
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_self_window_matches_brute_force(device, backend, window_name, layout_name):
    layout = LAYOUTS[layout_name]
    spec = WINDOWS[window_name](layout.length)
    members = memberships(layout, spec)
    assert all(members), "every token belongs to at least one window"
    mod = make_module(device)
    x = tokens(layout, device)
    replicated = any(len(m) > 1 for m in members)
    reference = reference_loop if replicated else reference_masked

    def fn(module, xx, _kv):
        with use_backend(backend):
            return windowed(module, xx, layout, make_window(spec))

    run_and_compare(mod, x, fn, lambda m, xx, _kv: reference(m, xx, members))


def test_replication_cases_are_covered():
    """The parametrisation exercises both reference paths (guards against a vacuous suite)."""
    kinds = set()
    for layout in LAYOUTS.values():
        for make in WINDOWS.values():
            kinds.add(any(len(m) > 1 for m in memberships(layout, make(layout.length))))
    assert kinds == {True, False}
    # per-clip extras are replicated in space (T copies), time (H*W copies) and local windows
    clip = LAYOUTS["clip-E2"]
    assert [len(m) for m in memberships(clip, ("space",))][:2] == [T_, T_]
    assert [len(m) for m in memberships(clip, ("time",))][:2] == [H_ * W_, H_ * W_]
    # per-frame extras in a local window narrower than the frame: one copy per spatial block
    frame = LAYOUTS["frame-E1"]
    assert len(memberships(frame, ("local", 2, 2, 3))[0]) == 4


@pytest.mark.parametrize("layout_name", ["no-extras", "frame-E2"])
@pytest.mark.parametrize("window_name", ["space", "time", "local-frame", "ragged"])
def test_masked_and_loop_references_agree(window_name, layout_name):
    """The two reference paths agree where both apply (a check on the references)."""
    layout = LAYOUTS[layout_name]
    members = memberships(layout, WINDOWS[window_name](layout.length))
    mod = _double(make_module("cpu"))
    x = tokens(layout, "cpu").double()
    a = reference_masked(mod, x, members)
    b = reference_loop(mod, x, members)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # and windowing matters: global attention gives something else
    with use_backend("eager"):
        assert (mod(x) - a).abs().max() > 1e-3


@pytest.mark.parametrize("layout_name", ["frame-E1", "frame-E2", "clip-E2"])
@pytest.mark.parametrize("window_name", ["global", "space", "time", "local-divisible", "local-ragged", "ragged",
                                         "ragged-single"])
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_self_window_without_extras(device, backend, window_name, layout_name):
    """``query_extras=False``: extras neither attend nor are attended, and their output is zero."""
    layout = LAYOUTS[layout_name]
    spec = WINDOWS[window_name](layout.length)
    members = memberships(layout, spec, extras=False)
    mod = make_module(device, seed=5)
    x = tokens(layout, device, seed=6)
    replicated = any(len(m) > 1 for m in members)
    assert not replicated
    left_out = [i for i, m in enumerate(members) if not m]
    assert len(left_out) == layout.num_extra_tokens

    def fn(module, xx, _kv):
        with use_backend(backend):
            return windowed(module, xx, layout, make_window(spec), query_extras=False, key_extras=False)

    y = run_and_compare(mod, x, fn, lambda m, xx, _kv: reference_masked(m, xx, members))
    assert torch.equal(y[:, left_out], torch.zeros_like(y[:, left_out]))


@pytest.mark.parametrize("window", ["global", "space", "time"])
def test_window_by_name_matches_instance(window):
    layout = LAYOUTS["frame-E1"]
    mod = make_module("cpu")
    x = tokens(layout, "cpu")
    with use_backend("eager"):
        a = windowed(mod, x, layout, window)
        b = windowed(mod, x, layout, make_window((window,)))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_window_with_qkv_bias_qv_and_qk_norm():
    layout = LAYOUTS["clip-E2"]
    spec = ("local", 2, 2, 3)
    mod = make_module("cpu", seed=3, qkv_bias="qv", qk_norm=True)
    members = memberships(layout, spec)

    def fn(module, xx, _kv):
        with use_backend("sdpa"):
            return windowed(module, xx, layout, make_window(spec))

    run_and_compare(mod, tokens(layout, "cpu", seed=4), fn, lambda m, xx, _kv: reference_loop(m, xx, members))


# ---------------------------------------------------------------------------------------------
# cross-attention windows
# ---------------------------------------------------------------------------------------------

Q_LAYOUT = TokenLayout(4, 2, 3, extras=1, per_frame_extras=True)  # e.g. CLIP frames with CLS
K_LAYOUT = TokenLayout(4, 2, 3)  # e.g. VideoMAE tubelets without extras


CROSS_CASES = [
    pytest.param("time", False, id="time-noqextras"),
    pytest.param("space", False, id="space-noqextras"),
    pytest.param("global", False, id="global-noqextras"),
    pytest.param("space", True, id="space-qextras"),
    pytest.param("global", True, id="global-qextras"),
]


@pytest.mark.parametrize(("window", "query_extras"), CROSS_CASES)
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_cross_window_matches_brute_force(device, backend, window, query_extras):
    q_members = memberships(Q_LAYOUT, (window,), extras=query_extras)
    k_members = memberships(K_LAYOUT, (window,), extras=False)
    mod = make_module(device, seed=7)
    x = tokens(Q_LAYOUT, device, seed=8)
    kv = tokens(K_LAYOUT, device, seed=9)

    def fn(module, xx, kk):
        with use_backend(backend):
            return windowed(module, xx, Q_LAYOUT, window, kv=kk, kv_layout=K_LAYOUT,
                            query_extras=query_extras, key_extras=False)

    y = run_and_compare(mod, x, fn, lambda m, xx, kk: reference_masked(m, xx, q_members, kk, k_members), kv=kv)
    cls = list(range(0, Q_LAYOUT.length, Q_LAYOUT.extras + Q_LAYOUT.n))  # first token of every frame
    if query_extras:
        assert y[:, cls].abs().max() > 1e-3
    else:
        assert torch.equal(y[:, cls], torch.zeros_like(y[:, cls]))  # left-out queries are exactly zero
        assert y[:, [c + 1 for c in cls]].abs().max() > 1e-3


def test_cross_references_agree():
    q_members = memberships(Q_LAYOUT, ("time",), extras=False)
    k_members = memberships(K_LAYOUT, ("time",), extras=False)
    mod = _double(make_module("cpu", seed=7))
    x, kv = tokens(Q_LAYOUT, "cpu", seed=8).double(), tokens(K_LAYOUT, "cpu", seed=9).double()
    torch.testing.assert_close(reference_masked(mod, x, q_members, kv, k_members),
                               reference_loop(mod, x, q_members, kv, k_members), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS[:2])
def test_cross_time_window_different_frame_counts(device, backend):
    """Current behaviour: a time window only needs the same H·W on both sides (same number of
    sequences); 4 query frames attend 2 key frames per location. NOTE: windows.py's docstring
    example says a time window "needs the same T"; if that is meant to be enforced, this test
    should become a ``pytest.raises(ValueError)``."""
    q_layout, k_layout = TokenLayout(4, 2, 3, 1, True), TokenLayout(2, 2, 3)
    q_members = memberships(q_layout, ("time",), extras=False)
    k_members = memberships(k_layout, ("time",), extras=False)
    mod = make_module(device, seed=14)
    x, kv = tokens(q_layout, device, seed=15), tokens(k_layout, device, seed=16)

    def fn(module, xx, kk):
        with use_backend(backend):
            return windowed(module, xx, q_layout, "time", kv=kk, kv_layout=k_layout,
                            query_extras=False, key_extras=False)

    run_and_compare(mod, x, fn, lambda m, xx, kk: reference_masked(m, xx, q_members, kk, k_members), kv=kv)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS[:2])
def test_cross_ragged_local_window(device, backend):
    """Cross-attention where both sides are ragged (packed BlockDiagonal path with Lq != Lk)."""
    q_layout, k_layout = TokenLayout(3, 3, 4, 1, True), TokenLayout(3, 3, 4, 2, False)
    spec = ("local", 2, 2, 3)
    q_members = memberships(q_layout, spec, extras=False)
    k_members = memberships(k_layout, spec, extras=True)
    mod = make_module(device, seed=11)
    x, kv = tokens(q_layout, device, seed=12), tokens(k_layout, device, seed=13)

    def fn(module, xx, kk):
        with use_backend(backend):
            return windowed(module, xx, q_layout, make_window(spec), kv=kk, kv_layout=k_layout,
                            query_extras=False, key_extras=True)

    run_and_compare(mod, x, fn, lambda m, xx, kk: reference_masked(m, xx, q_members, kk, k_members), kv=kv)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_incompatible_layouts_raise_naming_both():
    mod = make_module("cpu")
    x, kv = tokens(Q_LAYOUT, "cpu"), tokens(K_LAYOUT, "cpu")
    # time window: the per-frame CLS form one more location on the query side only
    with pytest.raises(ValueError) as info:
        windowed(mod, x, Q_LAYOUT, "time", kv=kv, kv_layout=K_LAYOUT, query_extras=True, key_extras=False)
    assert str(Q_LAYOUT) in str(info.value) and str(K_LAYOUT) in str(info.value)
    # time window over grids of different H*W
    other = TokenLayout(4, 3, 3)
    with pytest.raises(ValueError) as info:
        windowed(mod, x, Q_LAYOUT, "time", kv=tokens(other, "cpu"), kv_layout=other, query_extras=False)
    assert str(Q_LAYOUT) in str(info.value) and str(other) in str(info.value)
    # space window over a different number of frames
    fewer = TokenLayout(2, 2, 3)
    with pytest.raises(ValueError) as info:
        windowed(mod, x, Q_LAYOUT, "space", kv=tokens(fewer, "cpu"), kv_layout=fewer, query_extras=False)
    assert str(Q_LAYOUT) in str(info.value) and str(fewer) in str(info.value)


def test_wrong_token_count_raises_naming_shape():
    mod = make_module("cpu")
    layout = LAYOUTS["frame-E1"]
    bad = torch.randn(2, layout.length - 1, DIM)
    with pytest.raises(ValueError) as info:
        windowed(mod, bad, layout, "space")
    assert str((2, layout.length - 1, DIM)) in str(info.value)
    with pytest.raises(ValueError) as info:
        windowed(mod, tokens(Q_LAYOUT, "cpu"), Q_LAYOUT, "global", kv=torch.randn(2, 5, DIM), kv_layout=K_LAYOUT)
    assert "(2, 5, 16)" in str(info.value)


def test_ragged_lengths_must_sum_to_length():
    mod = make_module("cpu")
    layout = LAYOUTS["no-extras"]
    with pytest.raises(ValueError) as info:
        windowed(mod, tokens(layout, "cpu"), layout, Ragged((10, 20)))
    assert "30" in str(info.value) and str(layout.length) in str(info.value)


def test_self_attention_cannot_drop_key_extras_only():
    mod = make_module("cpu")
    layout = LAYOUTS["frame-E1"]
    with pytest.raises(ValueError):
        windowed(mod, tokens(layout, "cpu"), layout, "space", query_extras=True, key_extras=False)


def test_self_attention_extras_flags_must_agree():
    layout = LAYOUTS["frame-E1"]
    with pytest.raises(ValueError, match="same query_extras and key_extras"):
        windowed(make_module("cpu"), tokens(layout, "cpu"), layout, "space", query_extras=False)
