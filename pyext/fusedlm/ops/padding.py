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
    keep = attention_mask.reshape(-1) != 0
    indices = keep.nonzero().squeeze(1)
    lens = (attention_mask != 0).sum(1, dtype=torch.int32)
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=x.device)
    cu[1:] = lens.cumsum(0)
    return x.reshape(-1, *x.shape[2:]).index_select(0, indices), indices, cu, int(lens.max()) if lens.numel() else 0


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
    """`unpad` with shapes that do not depend on the mask: every token is a row, each batch
    row's real tokens first (in order), then its padding, and each row's padding is a sequence
    of its own, so attention never mixes the two. Returns (x_rows (batch * seq, ...), indices
    (batch * seq,), cu_seqlens int32 (2 * batch + 1,): real and padding sequences alternating,
    max_seqlen = seq, real (batch * seq,) bool: which rows are real tokens). Rows of padding cost
    work (their attention only among themselves); nothing is read back to the host."""
    _check_mask(x, attention_mask)
    batch, seq = attention_mask.shape
    keep = attention_mask != 0
    # A stable sort of each row by "is padding" puts its real tokens first, in order.
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)
    base = torch.arange(batch, device=x.device)[:, None] * seq
    indices = (order + base).reshape(-1)
    lens = keep.sum(1, dtype=torch.int32)
    cu = torch.zeros(2 * batch + 1, dtype=torch.int32, device=x.device)
    cu[1::2] = (base[:, 0] + lens).to(torch.int32)
    cu[2::2] = (base[:, 0] + seq).to(torch.int32)
    real = (torch.arange(seq, device=x.device) < lens[:, None]).reshape(-1)
    return x.reshape(-1, *x.shape[2:]).index_select(0, indices), indices, cu, seq, real


def pad(x_packed: Tensor, indices: Tensor, batch: int, seq: int):
    """Inverse of `unpad`: (total, ...) -> (batch, seq, ...), zeros where there was padding."""
    out = x_packed.new_zeros((batch * seq, *x_packed.shape[1:]))
    out.index_copy_(0, indices, x_packed)
    return out.view(batch, seq, *x_packed.shape[1:])
