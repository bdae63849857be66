"""flash_attn.bert_padding's unpad_input / pad_input on fusedlm.ops.padding."""
import torch

from fusedlm.ops import padding


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """-> (rows (total, ...), indices, cu_seqlens int32, max_seqlen, seqused (batch,) int32)."""
    if unused_mask is not None:
        raise ValueError("unused_mask: fusedlm's unpad takes only the attention mask")
    rows, indices, cu, max_seqlen = padding.unpad(hidden_states, attention_mask)
    return rows, indices, cu, max_seqlen, attention_mask.sum(-1, dtype=torch.int32)


def pad_input(hidden_states, indices, batch, seqlen):
    return padding.pad(hidden_states, indices, batch, seqlen)
