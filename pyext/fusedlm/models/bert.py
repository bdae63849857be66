"""BERT on fusedlm's kernels, with Hugging Face's parameter names (checkpoints load one to one).

A padded batch is unpacked by its attention_mask once, at the embeddings, and every layer then
runs on the real tokens only: the linear layers, the fused residual + LayerNorm, the attention
(variable-length path) and the masked-LM loss (labelled rows only). Nothing is computed for
padding. `sequence_output` is padded back only when it is asked for.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn import LayerNorm, MaskedLMHead
from ..nn.layers import EncoderLayer
from ..nn.lm_head import check_capacity
from ..ops import pad, unpad, unpad_static
from ..ops.attention import check_varlen_offsets
from ..ops.lm_loss import check_accum_dtype
from ..ops._tensors import require
from .config import FromHF
from .init import init_weights


@dataclass
class BertConfig(FromHF):
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    classifier_dropout: Optional[float] = None
    initializer_range: float = 0.02
    # RoBERTa numbers positions from pad_token_id + 1, counting real tokens only.
    positions_after_padding: bool = False
    # The most tokens the masked-LM head computes, as a fraction of the tokens it is given (the
    # real ones in eager mode, every one under torch.compile) or a count: BERT's
    # max_predictions_per_seq, per batch. None: the labelled tokens exactly in eager mode
    # (one host sync), every token under torch.compile. Set (0.2 for 15% masking) to compile the
    # head with the labelled rows' work and no host sync; a batch labelling more is an error.
    mlm_capacity: Optional[float] = None
    # torch.float32: the tied decoder weight's gradient summed in fp32 across the masked-LM
    # loss's chunks when the model's weights are bf16/fp16 (fusedlm.lm_loss's accum_dtype).
    lm_loss_accum_dtype: Optional[torch.dtype] = None

    HF_MODEL_TYPES = ("bert",)
    HF_FIXED = {"is_decoder": False, "add_cross_attention": False,
                "position_embedding_type": "absolute"}


@dataclass
class RobertaConfig(BertConfig):
    """BERT's config with RoBERTa's defaults (roberta-base): positions after the padding index,
    one token type, eps 1e-5."""
    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    positions_after_padding: bool = True

    HF_MODEL_TYPES = ("roberta",)


class Packed(NamedTuple):
    """A padded batch as packed rows. Eager: the real tokens only (`unpad`), one sequence per
    batch row. Under torch.compile: every token (`unpad_static`: shapes fixed by the batch's, so
    one graph serves every mask), the batch rows' real tokens as sequences 0..batch-1, then
    their padding as sequences with no keys (`cu_seqlens_k`), `real` marking the real rows; what
    the model returns is the same either way."""
    hidden: Tensor       # (rows, H)
    indices: Tensor      # (rows,) positions in the flattened (batch * seq) batch
    cu_seqlens: Tensor   # (batch + 1,) int32, or (2 * batch + 1,) with `real`
    max_seqlen: int
    batch: int
    seq: int
    real: Optional[Tensor] = None  # (rows,) bool: real tokens; None when every row is one
    cu_seqlens_k: Optional[Tensor] = None  # the keys' offsets, where not cu_seqlens

    @staticmethod
    def of(x, attention_mask):
        """(rows of x, Packed without hidden) for a (batch, seq) x and its mask."""
        batch, seq = attention_mask.shape
        if torch.compiler.is_compiling():
            rows, indices, cu, cu_k, max_len, real = unpad_static(x, attention_mask)
        else:
            (rows, indices, cu, max_len), real, cu_k = unpad(x, attention_mask), None, None
        return rows, Packed(None, indices, cu, max_len, batch, seq, real, cu_k)

    @staticmethod
    def given(cu_seqlens, max_seqlen):
        """A batch the caller packed (fusedlm.packing): rows in order, sequence i is rows
        cu_seqlens[i]:cu_seqlens[i + 1]; a sequence may be empty (an unused slot)."""
        return Packed(None, None, cu_seqlens, max_seqlen, cu_seqlens.numel() - 1, 0, None)

    @property
    def caller_packed(self):
        return self.indices is None

    def with_hidden(self, hidden):
        return self._replace(hidden=hidden)

    @property
    def starts(self):
        """The first row of each batch row's real tokens (its [CLS]); an empty slot of a
        caller-packed batch points at a row that exists (what it reads is never used)."""
        if self.caller_packed:
            return self.cu_seqlens[:-1].long().clamp(max=max(self.hidden.shape[0] - 1, 0))
        return self.cu_seqlens[:self.batch].long()

    @property
    def lengths(self):
        """Real tokens per batch row."""
        return self.cu_seqlens[:self.batch + 1].diff()

    def padded(self):
        """(batch, seq, ...): the rows in place, zeros at padding (a caller-packed batch: the
        rows as they are)."""
        if self.caller_packed:
            return self.hidden
        h = self.hidden if self.real is None else torch.where(
            self.real.view(-1, *([1] * (self.hidden.dim() - 1))), self.hidden, 0)
        return pad(h, self.indices, self.batch, self.seq)

    def take(self, t):
        """The rows' entries of a (batch, seq, ...) tensor (of a caller-packed batch: t)."""
        if self.caller_packed:
            return t
        return t.reshape(-1, *t.shape[2:]).index_select(0, self.indices)

    def take_labels(self, labels, ignore_index=-100):
        """The rows' labels, ignore_index at padding rows (a label on padding is never used)."""
        y = self.take(labels)
        return y if self.real is None else y.masked_fill(~self.real, ignore_index)


def check_packed_batch(input_ids, attention_mask, cu_seqlens, max_seqlen, max_positions,
                       **per_token):
    """A caller-packed batch (fusedlm.packing.PackingCollator): input_ids (tokens,), cu_seqlens
    (sequences + 1,) int32 offsets, max_seqlen an int; every per-token tensor (tokens,). The
    offsets' values are checked here, on the device, once for every layer (which then skip
    attention_varlen's own check)."""
    if attention_mask is not None:
        raise ValueError("attention_mask must be None with cu_seqlens: a packed batch has no "
                         "padding (its sequences are cu_seqlens' ranges)")
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must have shape (tokens,) with cu_seqlens, got {tuple(input_ids.shape)}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor of sequences + 1 offsets")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or not 0 < max_seqlen <= max_positions:
        raise ValueError(f"max_seqlen must be an int in [1, {max_positions}] (the position "
                         f"embeddings) with cu_seqlens, got {max_seqlen!r}")
    for name, t in per_token.items():
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != input_ids.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but input_ids is on {input_ids.device}")
    check_varlen_offsets("cu_seqlens", cu_seqlens, input_ids.numel(), max_seqlen)


def packed_positions(cu_seqlens, tokens):
    """Each row's position within its sequence (0 at each sequence's first row)."""
    cu = cu_seqlens.long()
    rows = torch.arange(tokens, device=cu.device)
    return rows - cu[torch.bucketize(rows, cu[1:], right=True).clamp(max=cu.numel() - 1)]


class BertEmbeddings(torch.nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = torch.nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = torch.nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = torch.nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = torch.nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids):
        words = self.word_embeddings(input_ids)
        rest = self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        y, _ = self.LayerNorm(words, residual=rest)
        return self.dropout(y)


class BertLayer(EncoderLayer):
    """Post-LN encoder layer (fusedlm.nn.EncoderLayer) built from a BertConfig, on packed rows."""

    def __init__(self, c: BertConfig):
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"hidden_size ({c.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({c.num_attention_heads})")
        super().__init__(c.hidden_size, c.num_attention_heads, c.intermediate_size,
                         dropout=c.hidden_dropout_prob, attention_dropout=c.attention_probs_dropout_prob,
                         activation=c.hidden_act, eps=c.layer_norm_eps)

    def forward(self, packed: Packed):
        # The offsets were checked once for the whole stack (check_packed_batch), or made by
        # unpad / unpad_static.
        return packed.with_hidden(self.forward_packed(packed.hidden, packed.cu_seqlens,
                                                      packed.max_seqlen, packed.cu_seqlens_k,
                                                      check_offsets=False))


class BertEncoder(torch.nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = torch.nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, packed: Packed):
        for layer in self.layer:
            packed = layer(packed)
        return packed


class BertPooler(torch.nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = torch.nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, packed: Packed):
        # A sequence with no real token has no [CLS]: its offset is the next sequence's first
        # row (or past the last one), so it must be an error, not another sequence's state.
        if not packed.caller_packed:  # a packed batch's empty slots carry no label
            require((packed.lengths > 0).all(),
                    "every row of attention_mask needs a real token (its first, [CLS], feeds "
                    "the pooler); a row is all padding")
        first = packed.hidden.index_select(0, packed.starts)  # each [CLS]
        return torch.tanh(self.dense(first))


class BertModel(torch.nn.Module):
    """forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None) ->
    (packed sequence output, pooled output or None). Every sequence needs one real token
    (its first, [CLS], feeds the pooler); right or left padding are both fine."""

    def __init__(self, config: BertConfig, add_pooling_layer=True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
                cu_seqlens=None, max_seqlen=None):
        if cu_seqlens is not None:
            ids, types, positions, packed = self._packed_inputs(
                input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen)
        else:
            ids, types, positions, packed = self._padded_inputs(
                input_ids, attention_mask, token_type_ids, position_ids)
        hidden = self.embeddings(ids, types, positions)
        packed = self.encoder(packed.with_hidden(hidden))
        pooled = self.pooler(packed) if self.pooler is not None else None
        return packed, pooled

    def _padded_inputs(self, input_ids, attention_mask, token_type_ids, position_ids):
        """(token ids, token types, positions) of the rows, and the Packed that lays them out."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        if seq > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {seq} positions, more than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None and self.config.positions_after_padding:  # as RoBERTa
            real = (input_ids != self.config.pad_token_id).long()
            position_ids = real.cumsum(1) * real + self.config.pad_token_id
        elif position_ids is None:  # as Hugging Face's BERT: positions count padding too
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        ids, packed = Packed.of(input_ids, attention_mask)
        return ids, packed.take(token_type_ids), packed.take(position_ids), packed

    def _packed_inputs(self, input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens,
                       max_seqlen):
        check_packed_batch(input_ids, attention_mask, cu_seqlens, max_seqlen,
                           self.config.max_position_embeddings, token_type_ids=token_type_ids,
                           position_ids=position_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = packed_positions(cu_seqlens, input_ids.numel())
            if self.config.positions_after_padding:  # as RoBERTa: counted from pad_token_id + 1
                position_ids = position_ids + self.config.pad_token_id + 1
        return input_ids, token_type_ids, position_ids, Packed.given(cu_seqlens, max_seqlen)


class BertOutput(NamedTuple):
    loss: Optional[Tensor] = None
    mlm_loss: Optional[Tensor] = None
    nsp_loss: Optional[Tensor] = None
    mlm_accuracy: Optional[Tensor] = None
    prediction_logits: Optional[Tensor] = None    # only without labels (the logits are large)
    seq_relationship_logits: Optional[Tensor] = None
    logits: Optional[Tensor] = None               # sequence classification


def _mlm_options(c: BertConfig) -> dict:
    """The masked-LM head's options from the config, checked under the config's names."""
    check_capacity(c.mlm_capacity, "config.mlm_capacity")
    check_accum_dtype(c.lm_loss_accum_dtype, "config.lm_loss_accum_dtype")
    return dict(capacity=c.mlm_capacity, accum_dtype=c.lm_loss_accum_dtype)


class BertOnlyMLMHead(torch.nn.Module):
    """`cls` of BertForMaskedLM: the masked-LM head, decoder tied to the word embeddings."""

    def __init__(self, c: BertConfig, word_embeddings):
        super().__init__()
        self.predictions = MaskedLMHead(c.hidden_size, c.vocab_size, hidden_act=c.hidden_act,
                                        layer_norm_eps=c.layer_norm_eps,
                                        decoder_weight=word_embeddings.weight, **_mlm_options(c))


class BertPreTrainingHeads(BertOnlyMLMHead):
    """`cls` of BertForPreTraining: the masked-LM head and the next-sentence classifier."""

    def __init__(self, c: BertConfig, word_embeddings):
        super().__init__(c, word_embeddings)
        self.seq_relationship = torch.nn.Linear(c.hidden_size, 2)


def _mlm(head: MaskedLMHead, packed: Packed, labels):
    """Masked-LM loss on the real tokens (labels at padding are ignored), or the logits
    (batch, seq, V), computed for real tokens only and zero at padding."""
    if labels is None:
        return None, None, packed.with_hidden(head(packed.hidden)).padded()
    out = head(packed.hidden, packed.take_labels(labels), return_details=True)
    return out.loss, out.accuracy, None


def _slot_labels(packed: Packed, labels, ignore_index=-100):
    """Per-sequence labels; an empty slot of a caller-packed batch is ignored whatever it says."""
    if not packed.caller_packed:
        return labels
    if labels.shape != (packed.batch,):
        raise ValueError(f"labels must have one entry per sequence slot, ({packed.batch},), with "
                         f"cu_seqlens, got {tuple(labels.shape)}")
    return labels.masked_fill(packed.lengths == 0, ignore_index)


def _classification_loss(config, packed: Packed, logits, labels):
    """Cross-entropy over the sequences (MSE for num_labels == 1, as Hugging Face's)."""
    if labels is None:
        return None
    if config.num_labels != 1:
        return F.cross_entropy(logits.float(), _slot_labels(packed, labels))
    err = (logits.squeeze(-1).float() - labels.float()) ** 2
    if not packed.caller_packed:
        return err.mean()
    used = packed.lengths > 0  # empty slots of a packed batch count for nothing
    return torch.where(used, err, 0).sum() / used.sum().clamp_min(1)


class BertForPreTraining(torch.nn.Module):
    """BERT with its two pretraining heads: masked LM (decoder tied to the word embeddings) and
    next-sentence prediction. loss = mlm_loss + nsp_loss, as in Hugging Face."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        init_weights(self, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, next_sentence_label=None, *, cu_seqlens=None, max_seqlen=None):
        packed, pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        mlm_loss, accuracy, logits = _mlm(self.cls.predictions, packed, labels)
        nsp_logits = self.cls.seq_relationship(pooled)
        nsp_loss = None
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), _slot_labels(packed, next_sentence_label))
        parts = [t for t in (mlm_loss, nsp_loss) if t is not None]
        return BertOutput(loss=sum(parts) if parts else None, mlm_loss=mlm_loss, nsp_loss=nsp_loss,
                          mlm_accuracy=accuracy, prediction_logits=logits,
                          seq_relationship_logits=nsp_logits)


class BertForMaskedLM(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config, self.bert.embeddings.word_embeddings)
        init_weights(self, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, *, cu_seqlens=None, max_seqlen=None):
        packed, _ = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                              cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        loss, accuracy, logits = _mlm(self.cls.predictions, packed, labels)
        return BertOutput(loss=loss, mlm_loss=loss, mlm_accuracy=accuracy, prediction_logits=logits)


class BertForSequenceClassification(torch.nn.Module):
    """Pooled [CLS] -> dropout -> classifier; cross-entropy (or MSE for num_labels == 1)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = torch.nn.Dropout(p)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        init_weights(self, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, *, cu_seqlens=None, max_seqlen=None):
        packed, pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        logits = self.classifier(self.dropout(pooled))
        return BertOutput(loss=_classification_loss(self.config, packed, logits, labels), logits=logits)


# ---- RoBERTa: BERT's encoder under Hugging Face's RoBERTa names ------------------------------

class _RenamedKeys:
    """Mixin: the module's state_dict uses Hugging Face's names (`ours` -> `hf` prefixes, for
    parameters that sit at a different place in the module tree) and loads them too."""
    _RENAMES = ()  # (ours, hf) prefix pairs relative to the module

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._register_state_dict_hook(_RenamedKeys._to_hf)
        self._register_load_state_dict_pre_hook(_RenamedKeys._from_hf, with_module=True)

    @staticmethod
    def _to_hf(module, state, prefix, local_metadata):
        for ours, hf in module._RENAMES:
            for key in [k for k in state if k.startswith(prefix + ours)]:
                state[prefix + hf + key[len(prefix + ours):]] = state.pop(key)
        return state

    @staticmethod
    def _from_hf(module, state, prefix, *args):
        for ours, hf in module._RENAMES:
            for key in [k for k in state if k.startswith(prefix + hf)]:
                state[prefix + ours + key[len(prefix + hf):]] = state.pop(key)


class RobertaLMHead(_RenamedKeys, MaskedLMHead):
    """RoBERTa's `lm_head` (dense -> gelu -> layer_norm -> decoder + bias): BERT's masked-LM
    head, the same math, under RoBERTa's parameter names."""
    _RENAMES = (("transform.dense.", "dense."), ("transform.LayerNorm.", "layer_norm."))


class RobertaForMaskedLM(torch.nn.Module):
    """Hugging Face's RobertaForMaskedLM, keys `roberta.*` and `lm_head.*`, on fusedlm's BERT
    (no pooler; the decoder tied to the word embeddings)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.roberta = BertModel(config, add_pooling_layer=False)
        self.lm_head = RobertaLMHead(config.hidden_size, config.vocab_size, hidden_act=config.hidden_act,
                                     layer_norm_eps=config.layer_norm_eps,
                                     decoder_weight=self.roberta.embeddings.word_embeddings.weight,
                                     **_mlm_options(config))
        init_weights(self, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, *, cu_seqlens=None, max_seqlen=None):
        packed, _ = self.roberta(input_ids, attention_mask, token_type_ids, position_ids,
                                 cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        loss, accuracy, logits = _mlm(self.lm_head, packed, labels)
        return BertOutput(loss=loss, mlm_loss=loss, mlm_accuracy=accuracy, prediction_logits=logits)


class RobertaClassificationHead(torch.nn.Module):
    """RoBERTa's `classifier`: the first token's state -> dropout -> dense -> tanh -> dropout
    -> out_proj (no pooler)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dense = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = torch.nn.Dropout(p)
        self.out_proj = torch.nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, first):
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(first)))))


class RobertaForSequenceClassification(torch.nn.Module):
    """Hugging Face's RobertaForSequenceClassification, keys `roberta.*` and `classifier.*`, on
    fusedlm's BERT: the classification head reads each sequence's first token (<s>)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.roberta = BertModel(config, add_pooling_layer=False)
        self.classifier = RobertaClassificationHead(config)
        init_weights(self, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, *, cu_seqlens=None, max_seqlen=None):
        packed, _ = self.roberta(input_ids, attention_mask, token_type_ids, position_ids,
                                 cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if not packed.caller_packed:
            require((packed.lengths > 0).all(),
                    "every row of attention_mask needs a real token (its first, <s>, feeds the "
                    "classifier); a row is all padding")
        logits = self.classifier(packed.hidden.index_select(0, packed.starts))
        return BertOutput(loss=_classification_loss(self.config, packed, logits, labels), logits=logits)
