"""A padded batch to packed sequences and back: what turns a (batch, seq) BERT batch with its
padding mask into the variable-length layout of `attention_varlen`, and the result back.

`unpad` keeps the real tokens only: its shapes depend on the mask, read on the host (what eager
mode wants: no work on padding). `unpad_static` keeps every token with shapes fixed by the
batch's (what torch.compile and CUDA graphs need: nothing read back, one graph for every mask)."""
import torch
from torch import Tensor


def unpad(x: Tensor, attention_mask: Tensor):
    """x (batch, seq, ...) and its (batch, seq) mask (nonzero = a real token) ->
    (x_packed (total, ...), indices (total,), cu_seqlens int32 (batch + 1,), max_seqlen)."""
    _check_mask(x, attention_mask)
    keep = attention_mask != 0
    lens = keep.sum(1, dtype=torch.int32)
    longest = lens.max() if lens.numel() else None
    # nonzero waits for the GPU; the longest length, queued before it, is then read at once.
    indices = keep.reshape(-1).nonzero().squeeze(1)
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=x.device)
    cu[1:] = lens.cumsum(0)
    max_len = int(longest) if longest is not None else 0
    return x.reshape(-1, *x.shape[2:]).index_select(0, indices), indices, cu, max_len


def _check_mask(x, attention_mask):
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != x.shape[:2]:
        raise ValueError(f"attention_mask must have shape {tuple(x.shape[:2])}, got {tuple(attention_mask.shape)}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        # A float mask is 0/1 to Hugging Face but additive (0 / -inf or -10000) to torch: which
        # one a caller means cannot be told, so it is refused rather than read one way.
        raise TypeError("attention_mask must be bool or integer (nonzero = a real token, 0 = "
                        f"padding), got {attention_mask.dtype}: convert a 0/1 float mask with "
                        ".bool(), an additive one with (mask == 0)")


def unpad_static(x: Tensor, attention_mask: Tensor):
    """`unpad` with shapes that do not depend on the mask: every token is a row, the real tokens
    of all batch rows first (in order), then each batch row's padding, and no work is spent on
    padding in attention: each batch row's padding is a sequence of queries with no keys.
    Returns (x_rows (batch * seq, ...), indices (batch * seq,), cu_seqlens_q and cu_seqlens_k
    int32 (2 * batch + 1,): the batch rows' real tokens as sequences 0..batch-1, their padding
    as sequences batch..2*batch-1 (with no keys: cu_seqlens_k stops at the real rows), max_seqlen
    = seq, real (batch * seq,) bool: which rows are real tokens). A padding row's attention
    output is 0 (a query that sees no key); nothing is read back to the host."""
    _check_mask(x, attention_mask)
    batch, seq = attention_mask.shape
    keep = attention_mask != 0
    # A stable sort of every position by "is padding" puts the real tokens first, in order,
    # then the padding, batch row by batch row.
    indices = torch.argsort((~keep).reshape(-1).to(torch.uint8), stable=True)
    lens = keep.sum(1, dtype=torch.int32)
    real_rows = lens.sum(dtype=torch.int32)
    cu_q = torch.zeros(2 * batch + 1, dtype=torch.int32, device=x.device)
    cu_q[1:batch + 1] = lens.cumsum(0, dtype=torch.int32)
    cu_q[batch + 1:] = real_rows + (seq - lens).cumsum(0, dtype=torch.int32)
    cu_k = cu_q.clone()
    cu_k[batch + 1:] = real_rows
    real = torch.arange(batch * seq, device=x.device) < real_rows
    return x.reshape(-1, *x.shape[2:]).index_select(0, indices), indices, cu_q, cu_k, seq, real


def pad(x_packed: Tensor, indices: Tensor, batch: int, seq: int):
    """Inverse of `unpad`: (total, ...) -> (batch, seq, ...), zeros where there was padding."""
    out = x_packed.new_zeros((batch * seq, *x_packed.shape[1:]))
    out.index_copy_(0, indices, x_packed)
    return out.view(batch, seq, *x_packed.shape[1:])
