"""A drop-in torch.nn.MultiheadAttention on fusedlm's attention, and the in-place swap of the
ones inside plain PyTorch models (torch.nn.TransformerEncoderLayer and friends hold one)."""
from typing import List

import torch
import torch.nn.functional as F

from ..ops import attention, split_qkv
from ._swap import rebind, swap_modules


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention (same arguments, parameters and state_dict) whose
    self-attention runs fusedlm's kernels. The fused path serves batched self-attention
    (query is key is value) without attention weights (need_weights=False, as the Transformer
    layers ask), with a boolean key_padding_mask or a float one holding only 0 and -inf, and
    either no attn_mask or is_causal=True (whose attn_mask is then the causal mask, as PyTorch
    defines the hint). Every other call runs torch's own forward: a float mask with finite
    values is added to the scores there, which a keep-or-drop mask cannot express. Telling
    the two float kinds apart reads the mask (on a GPU, a wait for it: pass a bool mask to
    spare it; torch's Transformer layers turn a bool mask into a float one before this)."""

    def _fused_ok(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        return (query is key and key is value and query.dim() == 3 and not need_weights
                and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
                and (attn_mask is None or is_causal)
                and (key_padding_mask is None or key_padding_mask.dtype == torch.bool
                     or (key_padding_mask.is_floating_point() and bool(
                         ((key_padding_mask == 0) | (key_padding_mask == float("-inf"))).all()))))

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self._fused_ok(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        x = query if self.batch_first else query.transpose(0, 1)       # (batch, seq, embed)
        q, k, v = split_qkv(F.linear(x, self.in_proj_weight, self.in_proj_bias).unflatten(
            -1, (3, self.num_heads, self.head_dim)))
        keep = None
        if key_padding_mask is not None:  # torch: True / -inf = ignore; fusedlm: nonzero = attend
            # (a float mask here holds only 0 and -inf: see _fused_ok)
            keep = ~key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask == 0
        o = attention(q, k, v, causal=bool(is_causal), attention_mask=keep,
                      dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(o.flatten(-2))
        return (out if self.batch_first else out.transpose(0, 1)), None


def replace_attention(model: torch.nn.Module) -> List[str]:
    """Swap every torch.nn.MultiheadAttention in `model` for fusedlm's, in place, keeping the
    same Parameter objects. Returns the qualified names swapped."""
    return [name for name, _ in swap_modules(
        model, {torch.nn.MultiheadAttention: lambda child: rebind(child, MultiheadAttention)})]
