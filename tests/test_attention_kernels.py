"""Attention kernels and the ``Attention`` module against independent float64 references."""

from __future__ import annotations

import logging
import subprocess
import sys
import zlib

import pytest
import torch
from torch import nn

from fusionkit.attention import Attention, BlockDiagonal, attention, requested_backend, resolve_backend, use_backend
from fusionkit.attention import kernels

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (xformers has no CPU kernel)")

# (device, backend): every backend that has a kernel on the device
DEVICE_BACKENDS = [
    pytest.param("cpu", "eager", id="cpu-eager"),
    pytest.param("cpu", "sdpa", id="cpu-sdpa"),
    pytest.param("cuda", "eager", id="cuda-eager", marks=[pytest.mark.cuda, cuda]),
    pytest.param("cuda", "sdpa", id="cuda-sdpa", marks=[pytest.mark.cuda, cuda]),
    pytest.param("cuda", "xformers", id="cuda-xformers", marks=[pytest.mark.cuda, cuda]),
]

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)


@pytest.fixture(autouse=True)
def _exact_cuda_matmul() -> None:
    if HAS_CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


# ---------------------------------------------------------------------------------------------
# independent reference
# ---------------------------------------------------------------------------------------------


def block_mask(q_seqlens: tuple[int, ...], kv_seqlens: tuple[int, ...]) -> torch.Tensor:
    """(Lq, Lk) bool mask of ragged sequences, built with plain loops."""
    mask = torch.zeros(sum(q_seqlens), sum(kv_seqlens), dtype=torch.bool)
    q0 = k0 = 0
    for lq, lk in zip(q_seqlens, kv_seqlens, strict=True):
        mask[q0:q0 + lq, k0:k0 + lk] = True
        q0, k0 = q0 + lq, k0 + lk
    return mask


def reference_attention(q, k, v, bias=None, scale=None):
    """softmax(q kᵀ·scale + bias) v with explicit per-(batch, head) loops in float64."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Lq, K = q.shape
    Lk = k.shape[2]
    scale = K ** -0.5 if scale is None else scale
    if isinstance(bias, BlockDiagonal):
        bias = block_mask(bias.q_seqlens, bias.kv_seqlens).to(q.device)
    if bias is not None:
        bias = bias.expand(B, H, Lq, Lk) if bias.dim() == 4 else bias.expand(Lq, Lk)[None, None].expand(B, H, Lq, Lk)
    outs = []
    for b in range(B):
        heads = []
        for h in range(H):
            logits = (q[b, h] @ k[b, h].T) * scale
            if bias is not None:
                bb = bias[b, h]
                if bb.dtype == torch.bool:
                    logits = logits.masked_fill(~bb, float("-inf"))
                else:
                    logits = logits + bb.double()
            heads.append(torch.softmax(logits, dim=-1) @ v[b, h])
        outs.append(torch.stack(heads))
    return torch.stack(outs)


def _random_bool_mask(shape, gen):
    mask = torch.rand(shape, generator=gen) < 0.5
    # guarantee no fully masked row: every query may attend its own index modulo Lk
    Lq, Lk = shape[-2], shape[-1]
    diag = torch.zeros(Lq, Lk, dtype=torch.bool)
    diag[torch.arange(Lq), torch.arange(Lq) % Lk] = True
    return mask | diag


B, H, K = 2, 3, 8

# name -> (Lq, Lk, bias factory, scale)
CASES = {
    "none": (5, 7, lambda g, lq, lk: None, None),
    "none-self": (6, 6, lambda g, lq, lk: None, None),
    "float-11LL": (5, 7, lambda g, lq, lk: torch.randn(1, 1, lq, lk, generator=g), None),
    "float-BHLL": (5, 7, lambda g, lq, lk: torch.randn(B, H, lq, lk, generator=g), None),
    "float-B1LL": (5, 7, lambda g, lq, lk: torch.randn(B, 1, lq, lk, generator=g), None),
    "float-LL": (5, 7, lambda g, lq, lk: torch.randn(lq, lk, generator=g), None),
    "bool-BHLL": (5, 7, lambda g, lq, lk: _random_bool_mask((B, H, lq, lk), g), None),
    "bool-11LL": (5, 7, lambda g, lq, lk: _random_bool_mask((1, 1, lq, lk), g), None),
    "bool-LL": (6, 6, lambda g, lq, lk: _random_bool_mask((lq, lk), g), None),
    "blockdiag-self": (6, 6, lambda g, lq, lk: BlockDiagonal.self_attention([2, 3, 1]), None),
    "blockdiag-cross": (6, 9, lambda g, lq, lk: BlockDiagonal((2, 1, 3), (3, 4, 2)), None),
    "scale-none": (5, 7, lambda g, lq, lk: None, 0.3),
    "scale-float": (5, 7, lambda g, lq, lk: torch.randn(1, H, lq, lk, generator=g), 1.7),
    "scale-bool": (5, 7, lambda g, lq, lk: _random_bool_mask((B, 1, lq, lk), g), 0.45),
    "scale-blockdiag": (6, 9, lambda g, lq, lk: BlockDiagonal((2, 1, 3), (3, 4, 2)), 0.25),
}


def _to(bias, device):
    return bias.to(device) if isinstance(bias, torch.Tensor) else bias


@pytest.mark.parametrize("kv_dim", [K, 5], ids=["Kv=K", "Kv=5"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_backend_matches_reference_forward_and_grad(device, backend, case, kv_dim):
    Lq, Lk, make_bias, scale = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    q = torch.randn(B, H, Lq, K, generator=gen).to(device).requires_grad_()
    k = torch.randn(B, H, Lk, K, generator=gen).to(device).requires_grad_()
    v = torch.randn(B, H, Lk, kv_dim, generator=gen).to(device).requires_grad_()
    bias = _to(make_bias(gen, Lq, Lk), device)
    g = torch.randn(B, H, Lq, kv_dim, generator=gen).to(device)

    with use_backend(backend):
        assert resolve_backend(q) == backend
        out = attention(q, k, v, bias=bias, scale=scale)
    assert out.shape == (B, H, Lq, kv_dim)
    assert out.dtype == torch.float32
    (out * g).sum().backward()

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, bias=bias, scale=scale)
    (ref * g.double()).sum().backward()

    torch.testing.assert_close(out.double(), ref.detach(), atol=ATOL, rtol=1e-5)
    for name, got, want in (("q", q.grad, q64.grad), ("k", k.grad, k64.grad), ("v", v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_reference_is_not_trivial():
    """Sanity of the reference itself: masks and biases change the result."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=gen) for _ in range(3))
    plain = reference_attention(q, k, v)
    masked = reference_attention(q, k, v, bias=BlockDiagonal.self_attention([2, 2]))
    assert (plain - masked).abs().max() > 1e-2
    # block-diagonal == running each block on its own
    torch.testing.assert_close(masked[..., :2, :], reference_attention(q[..., :2, :], k[..., :2, :], v[..., :2, :]))
    torch.testing.assert_close(masked[..., 2:, :], reference_attention(q[..., 2:, :], k[..., 2:, :], v[..., 2:, :]))


# ---------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def dispatched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record which kernel :func:`attention` dispatches to."""
    calls: list[str] = []
    real_get = kernels.KERNELS.get

    def spy(name: str):
        calls.append(name)
        return real_get(name)

    monkeypatch.setattr(kernels.KERNELS, "get", spy)
    return calls


def _qkv(L=4):
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(1, 2, L, 8, generator=gen) for _ in range(3))


def test_use_backend_nests_and_restores(dispatched):
    q, k, v = _qkv()
    assert requested_backend() == "auto"
    with use_backend("eager"):
        assert requested_backend() == "eager"
        attention(q, k, v)
        with use_backend("sdpa"):
            assert requested_backend() == "sdpa"
            attention(q, k, v)
            with use_backend("auto"):
                assert requested_backend() == "auto"
                assert resolve_backend(q) == "sdpa"
        assert requested_backend() == "eager"
        attention(q, k, v)
    assert requested_backend() == "auto"
    assert dispatched == ["eager", "sdpa", "eager"]


def test_use_backend_restores_after_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with use_backend("eager"):
            with use_backend("sdpa"):
                raise RuntimeError("boom")
    assert requested_backend() == "auto"


def test_env_var_selects_backend(monkeypatch, dispatched):
    q, k, v = _qkv()
    monkeypatch.setenv("FUSIONKIT_ATTENTION", "eager")
    assert requested_backend() == "eager"
    attention(q, k, v)
    monkeypatch.setenv("FUSIONKIT_ATTENTION", " SDPA ")
    assert requested_backend() == "sdpa"
    attention(q, k, v)
    # the context manager wins over the environment
    monkeypatch.setenv("FUSIONKIT_ATTENTION", "sdpa")
    with use_backend("eager"):
        attention(q, k, v)
    monkeypatch.setenv("FUSIONKIT_ATTENTION", "auto")
    attention(q, k, v)
    assert dispatched == ["eager", "sdpa", "eager", "sdpa"]  # auto on CPU tensors


def test_env_var_invalid_raises(monkeypatch):
    monkeypatch.setenv("FUSIONKIT_ATTENTION", "flash9")
    q, k, v = _qkv()
    with pytest.raises(ValueError) as info:
        attention(q, k, v)
    msg = str(info.value)
    assert "flash9" in msg
    for name in ("auto", "eager", "sdpa", "xformers"):
        assert name in msg


def test_use_backend_invalid_name_raises():
    with pytest.raises(ValueError) as info:
        with use_backend("flashy"):
            pass
    msg = str(info.value)
    assert "flashy" in msg
    for name in ("auto", "eager", "sdpa", "xformers"):
        assert name in msg
    assert requested_backend() == "auto"


def test_forcing_xformers_on_cpu_raises_clear_error():
    q, k, v = _qkv()
    with use_backend("xformers"):
        with pytest.raises(RuntimeError) as info:
            attention(q, k, v)
    msg = str(info.value)
    assert "xformers" in msg and "CUDA" in msg and "cpu" in msg


def test_auto_resolves_to_sdpa_on_cpu(dispatched):
    q, k, v = _qkv()
    assert resolve_backend(q) == "sdpa"
    with use_backend("auto"):
        assert resolve_backend(q) == "sdpa"
        out = attention(q, k, v)
    assert dispatched == ["sdpa"]
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=ATOL, rtol=1e-5)


@cuda
@pytest.mark.cuda
def test_auto_resolves_to_xformers_on_cuda():
    q = torch.randn(1, 2, 4, 8, device="cuda")
    assert resolve_backend(q) == "xformers"
    assert resolve_backend(q.double()) == "sdpa"


def test_dropout_eager_seeded():
    q, k, v = _qkv(L=16)
    ref = reference_attention(q, k, v)
    with use_backend("eager"):
        a = attention(q, k, v, dropout_p=0.0)
        b = attention(q, k, v, dropout_p=0.0)
        torch.manual_seed(123)
        d1 = attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(123)
        d2 = attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(124)
        d3 = attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)  # p=0 is deterministic
    torch.testing.assert_close(a.double(), ref, atol=ATOL, rtol=1e-5)
    assert (d1 - a).abs().max() > 0.1  # dropout changes the output
    assert torch.equal(d1, d2)  # and is reproducible under a fixed seed
    assert (d1 - d3).abs().max() > 0.1


def test_wrong_rank_raises_naming_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError) as info:
        attention(q[0], k, v)
    msg = str(info.value)
    assert "(2, 4, 8)" in msg and "(1, 2, 4, 8)" in msg
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 4, 8\)"):
        attention(q, k, v[None])


def test_blockdiagonal_validation():
    with pytest.raises(ValueError):
        BlockDiagonal((2, 2), (4,))
    q, k, v = _qkv(L=4)
    with pytest.raises(ValueError, match="5"):
        attention(q, k, v, bias=BlockDiagonal.self_attention([2, 3]))
    mask = BlockDiagonal((1, 2), (2, 1)).materialize()
    assert torch.equal(mask, block_mask((1, 2), (2, 1)))


@pytest.mark.slow
def test_xformers_import_is_silent():
    code = "import fusionkit; from fusionkit.attention.kernels import _xformers_ops; _xformers_ops()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "xformers" not in proc.stderr.lower(), proc.stderr
    assert "xformers" not in proc.stdout.lower(), proc.stdout


def test_xformers_import_restores_logger_level():
    logger = logging.getLogger("xformers")
    before = logger.level
    kernels._xformers_ops()
    assert logger.level == before


# ---------------------------------------------------------------------------------------------
# the Attention module
# ---------------------------------------------------------------------------------------------

D, HEADS = 16, 4


def _randomize(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4 + (1.0 if p.dim() == 1 and p.numel() == D // HEADS else 0))


def _heads(t):
    return t.reshape(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2).double()


def _merge(t):
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_attention_module_matches_timm(device, backend, qk_norm):
    from timm.models.vision_transformer import Attention as TimmAttention

    theirs = TimmAttention(D, num_heads=HEADS, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm).eval()
    _randomize(theirs, 3)
    ours = Attention(D, HEADS, qkv_bias=True, qk_norm=qk_norm).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs, ours = theirs.to(device), ours.to(device)

    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(4)).to(device)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    with use_backend(backend):
        got = ours(x1)
    want = theirs(x2)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(5)).to(device)
    (got * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=ATOL, rtol=1e-5)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1.grad, p2.grad, atol=ATOL, rtol=1e-5, msg=lambda m, n=n1: f"{n}: {m}")


def _manual_module(mod: Attention, x, kv=None, key_bias_zero=False):
    """Projection + reference attention + output projection, written out in float64."""
    W = mod.qkv.weight.double()
    if hasattr(mod, "q_bias"):
        bq, bk, bv = mod.q_bias.double(), torch.zeros(D, dtype=torch.float64), mod.v_bias.double()
    else:
        bq, bk, bv = mod.qkv.bias.double().split(D)
    kv = x if kv is None else kv
    x, kv = x.double(), kv.double()
    q = x @ W[:D].T + bq
    k = kv @ W[D:2 * D].T + bk
    v = kv @ W[2 * D:].T + bv
    q, k, v = _heads(q), _heads(k), _heads(v)
    if not isinstance(mod.q_norm, nn.Identity):
        q = nn.functional.layer_norm(q, (D // HEADS,), mod.q_norm.weight.double(), mod.q_norm.bias.double())
        k = nn.functional.layer_norm(k, (D // HEADS,), mod.k_norm.weight.double(), mod.k_norm.bias.double())
    out = _merge(reference_attention(q, k, v))
    return out @ mod.proj.weight.double().T + mod.proj.bias.double()


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS[:2])
def test_qkv_bias_qv_uses_zero_key_bias(device, backend):
    # qk_norm makes a key bias observable (without it a key bias cancels in the softmax)
    mod = Attention(D, HEADS, qkv_bias="qv", qk_norm=True).eval()
    _randomize(mod, 7)
    assert mod.qkv.bias is None
    assert {n for n, _ in mod.named_parameters()} >= {"q_bias", "v_bias"}
    fused = mod.qkv_bias()
    assert torch.equal(fused[D:2 * D], torch.zeros(D))
    assert torch.equal(fused[:D], mod.q_bias) and torch.equal(fused[2 * D:], mod.v_bias)

    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(8)).requires_grad_()
    with use_backend(backend):
        got = mod(x)
    want = _manual_module(mod, x)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=1e-5)
    # a nonzero key bias would give a different answer: the check above can tell them apart
    wrong = Attention(D, HEADS, qkv_bias=True, qk_norm=True).eval()
    wrong.load_state_dict({**{k: v for k, v in mod.state_dict().items() if k not in ("q_bias", "v_bias")},
                           "qkv.bias": torch.cat([mod.q_bias, torch.randn(D, generator=torch.Generator().manual_seed(10)), mod.v_bias]).detach()})
    assert (_manual_module(wrong, x) - want).abs().max() > 1e-3
    # gradients reach both biases and match the manual computation
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(9))
    (got * g).sum().backward()
    qb, vb = mod.q_bias.grad.clone(), mod.v_bias.grad.clone()
    mod.zero_grad()
    (want * g.double()).sum().backward()
    torch.testing.assert_close(qb, mod.q_bias.grad, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(vb, mod.v_bias.grad, atol=ATOL, rtol=1e-5)
    assert qb.abs().max() > 1e-4 and vb.abs().max() > 1e-4


@pytest.mark.parametrize("qkv_bias", [True, "qv"])
@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
def test_kv_path_matches_manual_projection(device, backend, qkv_bias):
    mod = Attention(D, HEADS, qkv_bias=qkv_bias, qk_norm=False).eval()
    _randomize(mod, 11)
    mod = mod.to(device)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 5, D, generator=gen).to(device)
    prompts = torch.randn(2, 3, D, generator=gen).to(device)
    kv = torch.cat([x, prompts], dim=1)
    with use_backend(backend):
        got = mod(x, kv=kv)
        self_only = mod(x)

    # manual: keys/values are the concatenated projections of x and the prompts
    W = mod.qkv.weight.double().cpu()
    b = mod.qkv_bias().double().cpu()
    xd, pd = x.double().cpu(), prompts.double().cpu()
    q = xd @ W[:D].T + b[:D]
    k = torch.cat([xd @ W[D:2 * D].T, pd @ W[D:2 * D].T], 1) + b[D:2 * D]
    v = torch.cat([xd @ W[2 * D:].T, pd @ W[2 * D:].T], 1) + b[2 * D:]
    out = _merge(reference_attention(_heads(q), _heads(k), _heads(v)))
    want = out @ mod.proj.weight.double().cpu().T + mod.proj.bias.double().cpu()
    torch.testing.assert_close(got.double().cpu(), want, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(self_only.double().cpu(), _manual_module(mod.cpu(), x.cpu()), atol=ATOL, rtol=1e-5)
    assert (got - self_only).abs().max() > 1e-3


def test_attention_module_bias_and_validation():
    mod = Attention(D, HEADS).eval()
    _randomize(mod, 13)
    x = torch.randn(1, 6, D, generator=torch.Generator().manual_seed(14))
    with use_backend("sdpa"):
        packed = mod(x, bias=BlockDiagonal.self_attention([2, 4]))
    torch.testing.assert_close(packed[:, :2], mod(x[:, :2]), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(packed[:, 2:], mod(x[:, 2:]), atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 4)
    with pytest.raises(ValueError, match="qkv_bias"):
        Attention(D, HEADS, qkv_bias="kv")


@pytest.mark.parametrize(("dtype", "grad", "keys", "expected"), [
    (torch.bfloat16, True, 197, "eager"), (torch.float16, True, 1023, "eager"),
    (torch.bfloat16, True, 1024, "sdpa"), (torch.bfloat16, False, 197, "sdpa"), (torch.float32, True, 197, "sdpa"),
], ids=["bf16-train-short", "fp16-train-1023", "bf16-train-1024-keys", "bf16-no-grad", "fp32-train"])
def test_auto_on_cpu_trains_short_low_precision_attention_eagerly(dtype, grad, keys, expected):
    """The CPU rule of `auto`: eager only where autograd records a bf16/fp16 call with < 1024 keys."""
    from fusionkit.attention.kernels import CPU_EAGER_TRAINING_KEYS

    assert CPU_EAGER_TRAINING_KEYS == 1024
    q = torch.randn(1, 2, 8, 16, dtype=dtype, requires_grad=grad)
    k = torch.randn(1, 2, keys, 16, dtype=dtype)
    assert resolve_backend(q, k) == expected
    with torch.no_grad():
        assert resolve_backend(q, k) == "sdpa"
    with use_backend("sdpa"):
        assert resolve_backend(q, k) == "sdpa"


def test_auto_bf16_training_equals_the_eager_kernel_and_matches_sdpa():
    """Under `auto` a short bf16 training call is the eager kernel bit for bit (forward and gradients),
    and within bf16 rounding of SDPA's."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(2, 4, 50, 32, generator=gen).bfloat16() for _ in range(3)]
    g = torch.randn(2, 4, 50, 32, generator=gen).bfloat16()
    results = {}
    for backend in ("auto", "eager", "sdpa"):
        q, k, v = (t.clone().requires_grad_() for t in base)
        with use_backend(backend):
            out = attention(q, k, v)
        (out.float() * g.float()).sum().backward()
        results[backend] = [out, q.grad, k.grad, v.grad]
    for a, e in zip(results["auto"], results["eager"]):
        assert torch.equal(a, e)
    for a, s in zip(results["auto"], results["sdpa"]):
        torch.testing.assert_close(a.float(), s.float(), atol=0.05, rtol=0.05)
