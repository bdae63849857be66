"""GPT (GPT-2's architecture) on fusedlm's kernels, for causal-LM training.

Parameters keep GPT-2's names and its Conv1D layout (weight stored (in, out), y = x @ W + b), so
a Hugging Face GPT-2 state dict loads and saves one to one, transposed weights included. Each
block is pre-LN; the residual add is fused into the next LayerNorm (ln_2, the next block's
ln_1, ln_f). A padded batch runs on its real tokens only (causal variable-length attention) and
the loss never materializes the logits (fusedlm.lm_loss on the shifted labels).
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..nn import LayerNorm
from ..nn.layers import Conv1D, DecoderLayer  # noqa: F401 (Conv1D: GPT-2's layout)
from ..ops import lm_loss
from ..ops.lm_loss import check_accum_dtype
from .bert import Packed, check_packed_batch, packed_positions
from .config import FromHF
from .init import init_weights


@dataclass
class GPTConfig(FromHF):
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # torch.float32: the tied lm_head weight's gradient summed in fp32 across the loss's chunks
    # when the model's weights are bf16/fp16 (fusedlm.lm_loss's accum_dtype).
    lm_loss_accum_dtype: Optional[torch.dtype] = None

    HF_MODEL_TYPES = ("gpt2",)
    HF_FIXED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "add_cross_attention": False}


class GPTBlock(DecoderLayer):
    """Pre-LN block (fusedlm.nn.DecoderLayer) built from a GPTConfig. forward(delta, residual,
    packed, delta_dropout_p): see DecoderLayer.forward_fused."""

    def __init__(self, c: GPTConfig):
        if c.n_embd % c.n_head:
            raise ValueError(f"n_embd ({c.n_embd}) must be a multiple of n_head ({c.n_head})")
        super().__init__(c.n_embd, c.n_head, c.n_inner, dropout=c.resid_pdrop,
                         attention_dropout=c.attn_pdrop, activation=c.activation_function,
                         eps=c.layer_norm_epsilon)

    def forward(self, delta, residual, packed: Packed, delta_dropout_p=0.0):
        # The offsets were checked once for the whole stack (check_packed_batch), or made by
        # unpad / unpad_static.
        return self.forward_fused(delta, residual, packed.cu_seqlens, packed.max_seqlen,
                                  packed.cu_seqlens_k, check_offsets=False,
                                  delta_dropout_p=delta_dropout_p)


class GPTModel(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = torch.nn.Embedding(config.n_positions, config.n_embd)
        self.drop = torch.nn.Dropout(config.embd_pdrop)
        self.h = torch.nn.ModuleList(GPTBlock(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        init_weights(self, config.initializer_range, ("c_proj.weight",), config.n_layer)

    def forward(self, input_ids, attention_mask=None, position_ids=None, *, cu_seqlens=None,
                max_seqlen=None) -> Packed:
        """Returns the final hidden states of the real tokens (see bert.Packed). With
        cu_seqlens, a caller-packed batch (fusedlm.packing): input_ids (tokens,)."""
        if cu_seqlens is not None:
            check_packed_batch(input_ids, attention_mask, cu_seqlens, max_seqlen,
                               self.config.n_positions, position_ids=position_ids)
            if position_ids is None:
                position_ids = packed_positions(cu_seqlens, input_ids.numel())
            return self._blocks(input_ids, position_ids, Packed.given(cu_seqlens, max_seqlen))
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        if seq > self.config.n_positions:
            raise ValueError(f"input_ids has {seq} positions, more than n_positions={self.config.n_positions}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        ids, packed = Packed.of(input_ids, attention_mask)
        return self._blocks(ids, packed.take(position_ids), packed)

    def _blocks(self, ids, pos, packed):
        residual, delta, p = self.drop(self.wte(ids) + self.wpe(pos)), None, 0.0
        for block in self.h:  # each block's MLP output is dropped out in the next norm's kernels
            delta, residual = block(delta, residual, packed, p)
            p = block.mlp_dropout_p
        y, _ = (self.ln_f(delta, residual=residual, dropout_p=p) if delta is not None
                else (self.ln_f(residual), None))
        return packed.with_hidden(y)


class CausalLMOutput(NamedTuple):
    loss: Optional[Tensor] = None
    accuracy: Optional[Tensor] = None   # next-token argmax accuracy over labelled positions
    logits: Optional[Tensor] = None     # only without labels: (batch, seq, V), zero at padding


class GPTForCausalLM(torch.nn.Module):
    """GPT-2 LM: lm_head tied to wte. forward(input_ids, attention_mask=None, labels=None):
    with labels (-100 where nothing is predicted, e.g. padding), the mean next-token loss
    (position t predicts labels[t + 1], as GPT2LMHeadModel computes it), logits never whole."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        check_accum_dtype(config.lm_loss_accum_dtype, "config.lm_loss_accum_dtype")
        self.config = config
        self.transformer = GPTModel(config)
        self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, *,
                cu_seqlens=None, max_seqlen=None):
        packed = self.transformer(input_ids, attention_mask, position_ids, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen)
        if labels is None:
            return CausalLMOutput(logits=packed.with_hidden(self.lm_head(packed.hidden)).padded())
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        # Shift within each packed sequence: row t predicts row t + 1; a sequence's last row
        # predicts nothing.
        y = packed.take_labels(labels)
        rows = y.numel()
        # One spare slot takes the "end" of an empty leading sequence (-1): static shapes, no
        # boolean indexing (what torch.compile needs).
        shifted = torch.cat([y[1:], y.new_full((2,), -100)])
        ends = packed.cu_seqlens[1:].long() - 1
        shifted = shifted.index_fill(0, torch.where(ends >= 0, ends, rows), -100)[:rows]
        out = lm_loss(packed.hidden, self.lm_head.weight, shifted, return_details=True,
                      accum_dtype=self.config.lm_loss_accum_dtype)
        return CausalLMOutput(loss=out.loss, accuracy=out.accuracy)
