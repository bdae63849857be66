"""flash-attn's functional API on fusedlm's kernels: switch by changing an import.

    from fusedlm.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

Also the qkv- and kv-packed variants (flash_attn_qkvpacked_func, flash_attn_kvpacked_func,
flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func), taking the packed tensor by
strides.

Same argument names, order, defaults and return conventions as flash-attn 2 for the features
fusedlm has, sliding windows (window_size), softcapping (softcap) and ALiBi (alibi_slopes)
included. Features it does not have (paged KV; ALiBi together with softcap) raise a ValueError
naming the argument instead of computing something else. fusedlm's kernels use no
atomics; `deterministic=True` also pins their block sizes (see fusedlm.attention). A query
that sees no key (causal with seqlen_q > seqlen_k) has softmax_lse -inf, the log-sum-exp of
nothing, where flash-attn writes +inf.

`return_attn_probs=True` with dropout returns flash-attn's debugging S_dmask as the third
value, in its encoding: (batch, nheads, seqlen_q, seqlen_k) float32, the unnormalized
probabilities exp(score - running max) with each dropped one negated, so `S_dmask >= 0` is the
keep mask the call drew. flash-attn's running max is over the key blocks it has walked
(`_get_block_size_n` gives the block); fusedlm's S_dmask is one block, so the max is the row's
and `S_dmask.abs() * exp(rowmax - lse)` are the probabilities: flash-attn's own tests decode it
with this module's `_get_block_size_n`. Computed beside the kernel with the reference math
(memory grows with seqlen_q x seqlen_k, as flash-attn's does; for tests, not training). Without
dropout it is None, as flash-attn's; the varlen functions refuse it with dropout (their packed
streams draw another layout).
"""
import torch

from . import reference
from .ops import dispatch
from .ops.attention import _seed, attention, attention_varlen, dropout_mask


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """The key-block width of S_dmask's encoding (flash-attn's helper of the same name, which
    its tests call to decode S_dmask): fusedlm's S_dmask is one block over every key."""
    return 2 ** 31 - 1


def _unsupported(block_table=None):
    if block_table is not None:
        raise ValueError("block_table: fusedlm has no paged KV cache (only None)")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, nheads, headdim), k and v (batch, seqlen_k, nheads_k, headdim) ->
    out like q; with return_attn_probs, (out, softmax_lse (batch, nheads, seqlen_q), S_dmask or
    None: see the module docstring)."""
    seed = None
    if return_attn_probs and dropout_p > 0:  # the seed the S_dmask must reproduce
        seed = _seed(dropout_p, None, q.shape[0] * q.shape[2])
    out, lse = attention(q, k, v, causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale,
                         return_lse=True, deterministic=deterministic,
                         window_size=tuple(window_size), softcap=softcap,
                         alibi_slopes=alibi_slopes, seed=seed)
    if not return_attn_probs:
        return out
    if seed is None:
        return out, lse, None
    p, _ = reference.attention_probabilities(q.detach(), k.detach(), causal=causal,
                                             softmax_scale=softmax_scale,
                                             window=tuple(window_size), softcap=softcap,
                                             alibi_slopes=alibi_slopes)
    keep = dropout_mask(q.shape[0], q.shape[2], q.shape[1], k.shape[1], dropout_p, seed,
                        q.device, backend=dispatch.explain("attention").backend)
    # One block: exp(s - rowmax) = p / max(p); a row that sees no key stays zeros.
    p = p / p.amax(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return out, lse, torch.where(keep, p, -p).float()


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """qkv (batch, seqlen, 3, nheads, headdim), taken by strides."""
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """q (total_q, nheads, headdim), k and v (total_k, nheads_k, headdim), cu_seqlens int32 ->
    out (total_q, nheads, headdim); with return_attn_probs (no dropout), (out, lse (nheads,
    total_q), None)."""
    _unsupported(block_table)
    if return_attn_probs and dropout_p > 0:
        raise ValueError("return_attn_probs: fusedlm returns the dropout pattern (S_dmask) for "
                         "flash_attn_func and its packed forms, not for the varlen functions; "
                         "pass dropout_p=0 or return_attn_probs=False")
    out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                int(max_seqlen_k), causal=causal, dropout_p=dropout_p,
                                softmax_scale=softmax_scale, return_lse=True,
                                deterministic=deterministic, window_size=tuple(window_size),
                                softcap=softcap, alibi_slopes=alibi_slopes)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, nheads, headdim), kv (batch, seqlen_k, 2, nheads_k, headdim), taken
    by strides."""
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, nheads, headdim), taken by strides; one cu_seqlens for queries and keys."""
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """q (total_q, nheads, headdim), kv (total_k, 2, nheads_k, headdim), taken by strides."""
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)
