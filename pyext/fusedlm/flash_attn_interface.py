"""flash-attn's functional API on fusedlm's kernels: switch by changing an import.

    from fusedlm.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

Also the qkv- and kv-packed variants (flash_attn_qkvpacked_func, flash_attn_kvpacked_func,
flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func), taking the packed tensor by
strides.

Same argument names, order, defaults and return conventions as flash-attn 2 for the features
fusedlm has, sliding windows (window_size), softcapping (softcap) and ALiBi (alibi_slopes)
included. Features it does not have (paged KV; ALiBi together with softcap) raise a ValueError
naming the argument instead of computing something else. fusedlm's kernels use no
atomics; `deterministic=True` also pins their block sizes (see fusedlm.attention). With
`return_attn_probs=True` the third value (flash-attn's debugging S_dmask) is None, and a query
that sees no key (causal with seqlen_q > seqlen_k) has softmax_lse -inf, the log-sum-exp of
nothing, where flash-attn writes +inf.
"""
from .ops.attention import attention, attention_varlen


def _unsupported(block_table=None):
    if block_table is not None:
        raise ValueError("block_table: fusedlm has no paged KV cache (only None)")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, nheads, headdim), k and v (batch, seqlen_k, nheads_k, headdim) ->
    out like q; with return_attn_probs, (out, softmax_lse (batch, nheads, seqlen_q), None)."""
    out, lse = attention(q, k, v, causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale,
                         return_lse=True, deterministic=deterministic,
                         window_size=tuple(window_size), softcap=softcap,
                         alibi_slopes=alibi_slopes)
    return (out, lse, None) if return_attn_probs else out


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
    out (total_q, nheads, headdim); with return_attn_probs, (out, lse (nheads, total_q), None)."""
    _unsupported(block_table)
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
