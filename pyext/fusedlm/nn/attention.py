"""Self-attention module: fused QKV projection, fused attention, output projection."""
from typing import Optional

import torch

from ..ops import attention, attention_varlen, split_qkv


class SelfAttention(torch.nn.Module):
    """Multi-head (or grouped-query) self-attention on fusedlm's attention kernels.

    forward(x, attention_mask=None): x (batch, seq, hidden) with an optional (batch, seq)
    padding mask (nonzero = a real token), or forward(x, cu_seqlens=..., max_seqlen=...) on
    packed sequences x (total, hidden), which spends no work on padding. One matmul projects
    q, k and v (`qkv`), the attention reads them by strides (no copies), `out` projects back.
    `causal=True` for GPT-style decoders. Attention-probability dropout runs in the kernel
    while training.
    """

    def __init__(self, hidden_size, num_heads, *, num_kv_heads: Optional[int] = None,
                 causal=False, dropout=0.0, bias=True, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.causal, self.dropout, self.backend = causal, dropout, backend
        kw = dict(device=device, dtype=dtype)
        self.qkv = torch.nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias, **kw)
        self.out = torch.nn.Linear(hidden_size, hidden_size, bias=bias, **kw)

    def _split(self, qkv):
        h, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        if hk == h:  # the gradient then comes back as one tensor, uncopied (split_qkv)
            return split_qkv(qkv.unflatten(-1, (3, h, d)))
        q, k, v = qkv.split((h * d, hk * d, hk * d), dim=-1)
        return q.unflatten(-1, (h, d)), k.unflatten(-1, (hk, d)), v.unflatten(-1, (hk, d))

    def forward(self, x, attention_mask=None, *, cu_seqlens=None, max_seqlen=None):
        q, k, v = self._split(self.qkv(x))
        p = self.dropout if self.training else 0.0
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("pass attention_mask (padded batch) or cu_seqlens (packed), not both")
            o = attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                 causal=self.causal, dropout_p=p, backend=self.backend)
        else:
            o = attention(q, k, v, causal=self.causal, attention_mask=attention_mask,
                          dropout_p=p, backend=self.backend)
        return self.out(o.flatten(-2))
