"""Multi-head attention with projections, shared by every transformer expert.

Parameter names follow timm (``qkv``, ``q_norm``, ``k_norm``, ``proj``), so timm ViT weights load
as they are; converters map the other layouts (OpenAI/open_clip ``in_proj_weight``, VideoMAE
``q_bias``/``v_bias``, HF ``query``/``key``/``value``) onto it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from fusionkit.attention.kernels import Bias, attention


class Attention(nn.Module):
    """Multi-head self- or cross-attention: fused qkv projection, kernel, output projection.

    Args:
        dim: token width ``D``.
        num_heads: heads ``H`` (head dim ``D / H``).
        qkv_bias: ``True`` (one bias on the fused qkv), ``False``, or ``"qv"`` (learned query and
            value biases, zero key bias: VideoMAE / BEiT).
        qk_norm: LayerNorm on queries and keys per head (timm ``qk_norm``).
        attn_drop: attention dropout probability; proj_drop: dropout after the projection.

    ``forward(x, kv=None)`` attends the queries of ``x`` to the keys/values of ``kv`` (default
    ``x``), both projected by the same frozen weights: fusion operators re-run an expert's
    attention on regrouped tokens or with extra key/value tokens (prompts) this way.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool | str = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias is True)
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        elif qkv_bias not in (True, False):
            raise ValueError(f"qkv_bias must be True, False or 'qv', got {qkv_bias!r}")
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_bias(self) -> Tensor | None:
        """The ``(3·D,)`` bias of the fused projection (zero key bias for ``"qv"``)."""
        if hasattr(self, "q_bias"):
            return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return self.qkv.bias

    def _heads(self, t: Tensor) -> Tensor:
        return rearrange(t, "b l (h k) -> b h l k", h=self.num_heads)

    def forward(self, x: Tensor, kv: Tensor | None = None, bias: Bias = None, values: Tensor | None = None) -> Tensor:
        """Attend ``x`` ``(B, L, D)`` to ``kv`` ``(B, M, D)`` (default ``x``); returns ``(B, L, D)``.

        ``values`` ``(B, M, D)``, when given, supplies the value tokens instead of ``kv`` (keys from
        ``kv``, values from ``values``: AV-STFP's separate key and value prompts).
        """
        w, b = self.qkv.weight, self.qkv_bias()
        if kv is None and values is None:
            q, k, v = F.linear(x, w, b).chunk(3, dim=-1)
        else:
            d = x.shape[-1]
            kv = x if kv is None else kv
            q = F.linear(x, w[:d], None if b is None else b[:d])
            if values is None:
                k, v = F.linear(kv, w[d:], None if b is None else b[d:]).chunk(2, dim=-1)
            else:
                k = F.linear(kv, w[d:2 * d], None if b is None else b[d:2 * d])
                v = F.linear(values, w[2 * d:], None if b is None else b[2 * d:])
        q, k, v = self.q_norm(self._heads(q)), self.k_norm(self._heads(k)), self._heads(v)
        out = attention(q, k, v, bias=bias, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(out, "b h l k -> b l (h k)")))
