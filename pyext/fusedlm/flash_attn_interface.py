"""flash-attn's functional API on fusedlm's kernels: switch by changing an import.

    from fusedlm.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

Also the qkv- and kv-packed variants (flash_attn_qkvpacked_func, flash_attn_kvpacked_func,
flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func), taking the packed tensor by
strides.

Same argument names, order, defaults and return conventions as flash-attn 2 for the features
fusedlm has, sliding windows (window_size), softcapping (softcap) and ALiBi (alibi_slopes)
included. Features it does not have (paged KV, KV-cache decoding) raise a ValueError
naming the argument instead of computing something else. fusedlm's kernels use no
atomics unless FUSEDLM_TRITON_ATOMIC_DQ=1 asks for them, and `deterministic=True` never does
and also pins their block sizes (see fusedlm.attention). A query
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
dropout it is None, as flash-attn's. The varlen functions lay sequence i out at
[i, :, :len_q, :len_k] of (batch, nheads, max_seqlen_q, max_seqlen_k), zeros elsewhere.
"""
import torch

from . import reference
from .ops import dispatch
from .ops._tensors import dropout_seed
from .ops.attention import attention, attention_varlen, dropout_mask, padded_rows, split_qkv


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
    seed = _probs_seed(return_attn_probs, dropout_p, q.shape[0] * q.shape[2])
    out, lse = attention(q, k, v, causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale,
                         return_lse=True, deterministic=deterministic,
                         window_size=tuple(window_size), softcap=softcap,
                         alibi_slopes=alibi_slopes, seed=seed)

    def s_dmask():
        p, _ = reference.attention_probabilities(q.detach(), k.detach(), causal=causal,
                                                 softmax_scale=softmax_scale,
                                                 window=tuple(window_size), softcap=softcap,
                                                 alibi_slopes=alibi_slopes)
        keep = dropout_mask(q.shape[0], q.shape[2], q.shape[1], k.shape[1], dropout_p, seed,
                            q.device, backend=dispatch.explain("attention").backend)
        return _signed_blocks(p, keep)
    return _returned(out, lse, return_attn_probs, s_dmask if seed is not None else None)


def _probs_seed(return_attn_probs, dropout_p, streams):
    """The dropout seed S_dmask must reproduce, drawn here and handed to the kernel; None when
    no S_dmask is asked for (the kernel then draws its own)."""
    return dropout_seed(dropout_p, None, streams) if return_attn_probs and dropout_p > 0 else None


def _returned(out, lse, return_attn_probs, s_dmask):
    """flash-attn's return convention; s_dmask makes S_dmask, None without dropout."""
    if not return_attn_probs:
        return out
    return out, lse, None if s_dmask is None else s_dmask()


def _signed_blocks(p, keep):
    """S_dmask from the probabilities and the keep mask: one block, so exp(s - rowmax) =
    p / max(p), negated where dropped; a row that sees no key stays zeros."""
    p = p / p.amax(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return torch.where(keep, p, -p).float()


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """qkv (batch, seqlen, 3, nheads, headdim), taken by strides; its gradient comes back as one
    tensor written by the kernels, not three copied into one (split_qkv)."""
    q, k, v = split_qkv(qkv)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """q (total_q, nheads, headdim), k and v (total_k, nheads_k, headdim), cu_seqlens int32 ->
    out (total_q, nheads, headdim); with return_attn_probs, (out, lse (nheads, total_q),
    S_dmask or None: see the module docstring)."""
    _unsupported(block_table)
    max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)
    seed = _probs_seed(return_attn_probs, dropout_p, (cu_seqlens_q.numel() - 1) * q.shape[1])
    out, lse = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k,
                                causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                return_lse=True, deterministic=deterministic,
                                window_size=tuple(window_size), softcap=softcap,
                                alibi_slopes=alibi_slopes, seed=seed)

    def s_dmask():
        # Sequence i at [i, :, :len_q, :len_k] of (batch, nheads, max_seqlen_q, max_seqlen_k),
        # as flash-attn lays it out; zeros elsewhere.
        batch = cu_seqlens_q.numel() - 1
        lens_q, lens_k = cu_seqlens_q.diff().long(), cu_seqlens_k.diff().long()
        p, _ = reference.attention_probabilities(
            padded_rows(q.detach(), cu_seqlens_q, max_q), padded_rows(k.detach(), cu_seqlens_k, max_k),
            causal=causal, key_mask=torch.arange(max_k, device=q.device) < lens_k[:, None],
            softmax_scale=softmax_scale, lengths=(lens_q, lens_k), window=tuple(window_size),
            softcap=softcap, alibi_slopes=alibi_slopes)
        queries = torch.arange(max_q, device=q.device) < lens_q[:, None]
        keep = dropout_mask(batch, q.shape[1], max_q, max_k, dropout_p, seed, q.device,
                            backend=dispatch.explain("attention").backend,
                            cu_seqlens=(cu_seqlens_q, cu_seqlens_k))
        return _signed_blocks(p.masked_fill(~queries[:, None, :, None], 0), keep)
    return _returned(out, lse, return_attn_probs, s_dmask if seed is not None else None)


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
    """qkv (total, 3, nheads, headdim), taken by strides; one cu_seqlens for queries and keys;
    its gradient comes back as one tensor, as flash_attn_qkvpacked_func's."""
    q, k, v = split_qkv(qkv)
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
