"""Reference attention: plain PyTorch math (not SDPA), the oracle for the fused kernels.

Layout (batch, seq, heads, head_dim). Keys/values may have fewer heads than queries (grouped /
multi-query attention: query head h reads key head h // (heads / kv_heads)). Causal masking is
aligned bottom-right: query i of Sq attends key j of Sk iff j <= i + Sk - Sq (the last query
sees every key), as in flash-attn >= 2.1. A sliding window (left, right) limits query i to keys
i + Sk - Sq - left <= j <= i + Sk - Sq + right (-1: unbounded on that side), flash-attn's
window_size; causal bounds the right side at 0. A query row whose keys are all masked gives
zeros.
"""
import torch


def _wide(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def allowed_mask(sq, sk, *, causal=False, key_mask=None, lengths=None, window=(-1, -1),
                 device=None):
    """(batch or 1, 1, Sq, Sk) bool: True where query i may attend key j.
    lengths: (q_lens, k_lens), (batch,) tensors, for sequences padded on the right to Sq and Sk:
    the causal mask and the window are then aligned bottom-right of each sequence's own lengths.
    window: (left, right), see the module docstring."""
    allowed = torch.ones((1, 1, sq, sk), dtype=torch.bool, device=device)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0 or left >= 0:
        i = torch.arange(sq, device=device)[:, None]
        j = torch.arange(sk, device=device)[None, :]
        shift = sk - sq if lengths is None else (lengths[1] - lengths[0])[:, None, None, None]
        if right >= 0:
            allowed = allowed & (j <= i + shift + right)
        if left >= 0:
            allowed = allowed & (j >= i + shift - left)
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    return allowed


def attention_probabilities(q, k, *, causal=False, key_mask=None, softmax_scale=None,
                            lengths=None, window=(-1, -1), softcap=0.0, alibi_slopes=None):
    """The attention probabilities before dropout: (p (B, H, Sq, Sk), lse (B, H, Sq)) in float32
    (float64 for float64 input); arguments as `attention`'s. A row that sees no key is zeros
    with lse -inf."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    wide = _wide(q.dtype)
    qf, kf = q.to(wide), k.to(wide)
    if hk != h:
        kf = kf.repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        shift = sk - sq if lengths is None else (lengths[1] - lengths[0])[:, None, None, None]
        slopes = alibi_slopes.to(wide).reshape(-1, h)[:, :, None, None]
        s = s - slopes * (i + shift - j).abs().to(wide)
    allowed = allowed_mask(sq, sk, causal=causal, key_mask=key_mask, lengths=lengths,
                           window=window, device=q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # Only a row that sees no key (lse = -inf) is shifted by 0, to give zeros; a +inf score
    # gives NaN (inf - inf), as float64 math and SDPA do.
    p = torch.exp(s - lse[..., None].masked_fill(lse[..., None] == float("-inf"), 0.0))
    return p.masked_fill(~allowed, 0.0), lse


def attention(q, k, v, *, causal=False, key_mask=None, softmax_scale=None, dropout_p=0.0,
              dropout_keep=None, lengths=None, window=(-1, -1), softcap=0.0, alibi_slopes=None):
    """q: (B, Sq, H, D); k, v: (B, Sk, Hk, D); key_mask: (B, Sk), True = attend; lengths and
    window: see allowed_mask. softcap > 0: scores s become softcap * tanh(s / softcap).
    alibi_slopes (H,) or (B, H): -slope * |i + Sk - Sq - j| added to the (capped) scores.
    dropout_keep: (B, H, Sq, Sk) bool, the kept attention probabilities (scaled by 1/(1-p)).
    Returns (out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) natural log, -inf for empty rows)."""
    h, hk = q.shape[2], v.shape[2]
    p, lse = attention_probabilities(q, k, causal=causal, key_mask=key_mask,
                                     softmax_scale=softmax_scale, lengths=lengths, window=window,
                                     softcap=softcap, alibi_slopes=alibi_slopes)
    vf = v.to(p.dtype)
    if hk != h:
        vf = vf.repeat_interleave(h // hk, dim=2)
    if dropout_keep is not None:
        p = p * dropout_keep / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vf)
    return out.to(q.dtype), lse


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, softmax_scale=None,
                     window=(-1, -1), softcap=0.0, alibi_slopes=None):
    """Packed sequences: q (total_q, H, D), k, v (total_k, Hk, D); sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1]. Returns (out (total_q, H, D), lse (H, total_q))."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        o, l = attention(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]],
                         v[None, ck[i]:ck[i + 1]], causal=causal, softmax_scale=softmax_scale,
                         window=window, softcap=softcap,
                         alibi_slopes=(alibi_slopes[i] if alibi_slopes is not None and
                                       alibi_slopes.dim() == 2 else alibi_slopes))
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs), torch.cat(lses, dim=1)
