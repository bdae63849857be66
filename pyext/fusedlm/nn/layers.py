"""Transformer layers on fusedlm's kernels, config-driven, with Hugging Face's parameter names:

  EncoderLayer  post-LN, BERT's layer (attention -> add & norm -> MLP -> add & norm), names as
                in BertLayer (attention.self.query, ..., output.LayerNorm);
  DecoderLayer  pre-LN, GPT-2's block (ln_1 -> causal attention -> ln_2 -> MLP), names as in
                GPT2Block, its Conv1D weights stored (in, out).

Both take a padded batch, forward(x (batch, seq, hidden), attention_mask=None), which they unpad
around the attention, or packed sequences, forward(x (total, hidden), cu_seqlens=,
max_seqlen=), which spend no work on padding. Residual adds are fused into the LayerNorms.
fusedlm.models builds BERT and GPT from these same modules; a stack checks a caller's offsets
once and passes check_offsets=False to each layer (see ops.attention_varlen).
"""
from typing import Optional

import torch

from ..ops import attention_varlen, mlp, pad, split_qkv, unpad
from .activations import MLP_ACTIVATIONS, activation
from .layer_norm import LayerNorm


def _packed(x, attention_mask, cu_seqlens, max_seqlen):
    """-> (rows (total, hidden), cu_seqlens, max_seqlen, how to restore x's layout, whether the
    offsets need checking: a caller's do, those made here do not)."""
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("pass attention_mask (padded batch) or cu_seqlens (packed), not both")
        if x.dim() != 2 or max_seqlen is None:
            raise ValueError("packed input: x must be (total, hidden) and max_seqlen given with cu_seqlens")
        return x, cu_seqlens, int(max_seqlen), lambda y: y, True
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, seq, hidden), or (total, hidden) with cu_seqlens; got {tuple(x.shape)}")
    batch, seq = x.shape[:2]
    if attention_mask is None:
        cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=x.device)
        return x.reshape(batch * seq, -1), cu, seq, lambda y: y.view(batch, seq, -1), False
    rows, idx, cu, max_len = unpad(x, attention_mask)
    return rows, cu, max_len, lambda y: pad(y, idx, batch, seq), False


def _keys(cu_seqlens, cu_seqlens_k):
    """The keys' offsets: their own where given, else the queries' (self-attention)."""
    return cu_seqlens if cu_seqlens_k is None else cu_seqlens_k


def _heads(hidden_size, num_heads):
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")


# ---- the encoder (BERT) ---------------------------------------------------------------------

class EncoderSelfAttention(torch.nn.Module):
    def __init__(self, hidden_size, num_heads, attention_dropout):
        super().__init__()
        _heads(hidden_size, num_heads)
        self.heads = num_heads
        self.query = torch.nn.Linear(hidden_size, hidden_size)
        self.key = torch.nn.Linear(hidden_size, hidden_size)
        self.value = torch.nn.Linear(hidden_size, hidden_size)
        self.dropout_p = attention_dropout

    def forward(self, x, cu_seqlens, max_seqlen, cu_seqlens_k=None, check_offsets=True):
        # One GEMM for the three projections (Hugging Face's three parameters, concatenated:
        # a copy of the small weights), whose input gradient is then one GEMM too, not three
        # summed by two adds; split_qkv has the attention kernels write dq, dk and dv into one
        # buffer that this GEMM's backward reads as it is.
        projs = (self.query, self.key, self.value)
        qkv = torch.nn.functional.linear(x, torch.cat([p.weight for p in projs]),
                                         torch.cat([p.bias for p in projs]))
        q, k, v = split_qkv(qkv.unflatten(-1, (3, self.heads, -1)))
        o = attention_varlen(q, k, v, cu_seqlens, _keys(cu_seqlens, cu_seqlens_k), max_seqlen,
                             max_seqlen, dropout_p=self.dropout_p if self.training else 0.0,
                             check_offsets=check_offsets)
        return o.flatten(-2)


class ResidualOutput(torch.nn.Module):
    """dense -> dropout -> LayerNorm(. + residual), the dropout and the residual add fused into
    the norm's kernels (Hugging Face's BertSelfOutput and BertOutput; `dropout` holds p, as
    their nn.Dropout does)."""

    def __init__(self, in_features, hidden_size, dropout, eps):
        super().__init__()
        self.dense = torch.nn.Linear(in_features, hidden_size)
        self.LayerNorm = LayerNorm(hidden_size, eps=eps)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, h, residual):
        return self.add_norm(self.dense(h), residual)

    def add_norm(self, y, residual):
        """The dense layer's output `y` dropped out, added to `residual` and normalized."""
        p = self.dropout.p if self.training else 0.0
        return self.LayerNorm(y, residual=residual, dropout_p=p)[0]


class EncoderAttention(torch.nn.Module):
    def __init__(self, hidden_size, num_heads, dropout, attention_dropout, eps):
        super().__init__()
        self.self = EncoderSelfAttention(hidden_size, num_heads, attention_dropout)
        self.output = ResidualOutput(hidden_size, hidden_size, dropout, eps)

    def forward(self, x, cu_seqlens, max_seqlen, cu_seqlens_k=None, check_offsets=True):
        return self.output(self.self(x, cu_seqlens, max_seqlen, cu_seqlens_k, check_offsets), x)


class Intermediate(torch.nn.Module):
    def __init__(self, hidden_size, intermediate_size, act):
        super().__init__()
        self.dense = torch.nn.Linear(hidden_size, intermediate_size)
        activation(act)  # validates the name; looked up per call (modules stay picklable)
        self.hidden_act = act

    def forward(self, x):
        return activation(self.hidden_act)(self.dense(x))


class EncoderLayer(torch.nn.Module):
    """Post-LN encoder layer (BERT): attention -> add & norm -> MLP -> add & norm.

    EncoderLayer(hidden_size, num_heads, intermediate_size=4 * hidden_size, dropout=0.1,
    attention_dropout=0.1, activation="gelu", eps=1e-12). See the module docstring for forward.
    """

    def __init__(self, hidden_size, num_heads, intermediate_size: Optional[int] = None, *,
                 dropout=0.1, attention_dropout=0.1, activation="gelu", eps=1e-12):
        super().__init__()
        intermediate_size = intermediate_size or 4 * hidden_size
        self.attention = EncoderAttention(hidden_size, num_heads, dropout, attention_dropout, eps)
        self.intermediate = Intermediate(hidden_size, intermediate_size, activation)
        self.output = ResidualOutput(intermediate_size, hidden_size, dropout, eps)

    def forward_packed(self, x, cu_seqlens, max_seqlen, cu_seqlens_k=None, check_offsets=True):
        """On packed rows; cu_seqlens_k: the keys' own offsets where they differ from the
        queries' (fusedlm.ops.unpad_static's padding rows have no keys), else None."""
        h = self.attention(x, cu_seqlens, max_seqlen, cu_seqlens_k, check_offsets)
        # intermediate.dense -> act -> output.dense as one op, which keeps the activation's
        # input alone for the backward (see fusedlm.ops.mlp).
        up, down = self.intermediate.dense, self.output.dense
        y = mlp(h, up.weight, up.bias, down.weight, down.bias,
                MLP_ACTIVATIONS[self.intermediate.hidden_act])
        return self.output.add_norm(y, h)

    def forward(self, x, attention_mask=None, *, cu_seqlens=None, max_seqlen=None):
        rows, cu, max_len, restore, check = _packed(x, attention_mask, cu_seqlens, max_seqlen)
        return restore(self.forward_packed(rows, cu, max_len, check_offsets=check))


# ---- the decoder (GPT-2) --------------------------------------------------------------------

class Conv1D(torch.nn.Module):
    """GPT-2's linear layer: weight (in, out), y = x @ weight + bias."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(n_in, n_out).normal_(std=0.02))
        self.bias = torch.nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class DecoderAttention(torch.nn.Module):
    def __init__(self, hidden_size, num_heads, dropout, attention_dropout):
        super().__init__()
        _heads(hidden_size, num_heads)
        self.n_head = num_heads
        self.c_attn = Conv1D(hidden_size, 3 * hidden_size)
        self.c_proj = Conv1D(hidden_size, hidden_size)
        self.attn_pdrop = attention_dropout
        self.resid_dropout = torch.nn.Dropout(dropout)

    def forward(self, x, cu_seqlens, max_seqlen, cu_seqlens_k=None, check_offsets=True,
                dropout_output=True):
        """dropout_output=False: the output before resid_dropout (which the next norm's kernel
        then applies: DecoderLayer.forward_fused)."""
        q, k, v = split_qkv(self.c_attn(x).unflatten(-1, (3, self.n_head, -1)))
        o = attention_varlen(q, k, v, cu_seqlens, _keys(cu_seqlens, cu_seqlens_k), max_seqlen,
                             max_seqlen, causal=True,
                             dropout_p=self.attn_pdrop if self.training else 0.0,
                             check_offsets=check_offsets)
        out = self.c_proj(o.flatten(-2))
        return self.resid_dropout(out) if dropout_output else out


class DecoderMLP(torch.nn.Module):
    def __init__(self, hidden_size, intermediate_size, dropout, act):
        super().__init__()
        self.c_fc = Conv1D(hidden_size, intermediate_size)
        self.c_proj = Conv1D(intermediate_size, hidden_size)
        activation(act)
        self.activation_function = act
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x, dropout_output=True):
        """dropout_output=False: the output before its dropout (see DecoderAttention)."""
        # c_fc -> act -> c_proj as one op (see EncoderLayer); Conv1D's weights are (in, out).
        out = mlp(x, self.c_fc.weight.t(), self.c_fc.bias, self.c_proj.weight.t(),
                  self.c_proj.bias, MLP_ACTIVATIONS[self.activation_function])
        return self.dropout(out) if dropout_output else out


class DecoderLayer(torch.nn.Module):
    """Pre-LN decoder layer (GPT-2's block): x + attn(ln_1(x)), then + mlp(ln_2(.)), causal.

    DecoderLayer(hidden_size, num_heads, intermediate_size=4 * hidden_size, dropout=0.1,
    attention_dropout=0.1, activation="gelu_new", eps=1e-5). See the module docstring for
    forward; `forward_fused` is the form a stack uses to fuse each residual dropout and add
    into the next LayerNorm.
    """

    def __init__(self, hidden_size, num_heads, intermediate_size: Optional[int] = None, *,
                 dropout=0.1, attention_dropout=0.1, activation="gelu_new", eps=1e-5):
        super().__init__()
        self.ln_1 = LayerNorm(hidden_size, eps=eps)
        self.attn = DecoderAttention(hidden_size, num_heads, dropout, attention_dropout)
        self.ln_2 = LayerNorm(hidden_size, eps=eps)
        self.mlp = DecoderMLP(hidden_size, intermediate_size or 4 * hidden_size, dropout, activation)

    @property
    def mlp_dropout_p(self):
        """The dropout probability of this layer's MLP output, which forward_fused returns
        undropped (0 when not training)."""
        return self.mlp.dropout.p if self.training else 0.0

    def forward_fused(self, delta, residual, cu_seqlens, max_seqlen, cu_seqlens_k=None,
                      check_offsets=True, delta_dropout_p=0.0):
        """`delta` is the previous layer's MLP output before its dropout (None for the first
        layer), dropped out with `delta_dropout_p` (that layer's `mlp_dropout_p`) and added to
        the residual stream inside ln_1's kernels; returns this layer's MLP output, before its
        dropout, and the residual stream it has not yet been added to. The attention output's
        dropout runs in ln_2's kernels likewise. cu_seqlens_k: as in EncoderLayer.forward_packed."""
        if delta is None:
            y = self.ln_1(residual)
        else:
            y, residual = self.ln_1(delta, residual=residual, dropout_p=delta_dropout_p)
        a = self.attn(y, cu_seqlens, max_seqlen, cu_seqlens_k, check_offsets, dropout_output=False)
        p = self.attn.resid_dropout.p if self.training else 0.0
        y, residual = self.ln_2(a, residual=residual, dropout_p=p)
        return self.mlp(y, dropout_output=False), residual

    def forward(self, x, attention_mask=None, *, cu_seqlens=None, max_seqlen=None):
        rows, cu, max_len, restore, check = _packed(x, attention_mask, cu_seqlens, max_seqlen)
        delta, residual = self.forward_fused(None, rows, cu, max_len, check_offsets=check)
        return restore(torch.nn.functional.dropout(delta, self.mlp_dropout_p) + residual)
