"""Language-model heads whose loss never materializes the logits.

`MaskedLMHead` is BERT's masked-LM head (dense + activation + LayerNorm transform, decoder tied
to the word embeddings, output bias) with parameter names that match Hugging Face's
`cls.predictions` one to one, so a checkpoint's `cls.predictions.*` keys load unchanged.
`LMHead` is an `nn.Linear` (GPT-2's `lm_head`: same parameters, same state_dict) that, given
labels, returns the fused causal-LM loss instead of the logits.
"""
import math
from typing import Optional, Union

import torch

from ..ops import lm_loss
from ..ops.lm_loss import check_accum_dtype, compact_labels
from .activations import activation
from .layer_norm import LayerNorm


def labelled_rows(hidden, labels, ignore_index=-100, capacity=None):
    """The rows of `hidden` (..., H) whose label (hidden's shape without H) is not
    ignore_index, and those labels: a masked-LM head transforms and projects only these.

    capacity None: exactly the labelled rows in eager mode (one host sync); under torch.compile
    every row (a data-dependent shape would break the graph; the loss ignores the rest).
    capacity: an int (rows) or a float in (0, 1] (a fraction of the rows, rounded up): that many
    rows, the labelled ones first, then ignored ones, with no host sync
    (`ops.lm_loss.compact_labels`: more labelled rows than the capacity is an error)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(hidden.device)
    if capacity is not None:
        idx, y_c, _ = compact_labels(y, capacity_rows(capacity, y.numel()), ignore_index)
        return (h, y) if idx is None else (h.index_select(0, idx), y_c)
    if torch.compiler.is_compiling():
        return h, y
    idx = (y != ignore_index).nonzero().squeeze(1)
    return h.index_select(0, idx), y.index_select(0, idx)


def capacity_rows(capacity, rows):
    """`capacity` (an int, or a float in (0, 1]: a fraction of `rows`, rounded up) as rows."""
    if isinstance(capacity, float):
        return max(1, math.ceil(capacity * rows))
    return capacity


def check_capacity(capacity, name="capacity"):
    if capacity is None:
        return
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or \
            (isinstance(capacity, int) and capacity < 1) or \
            (isinstance(capacity, float) and not 0.0 < capacity <= 1.0):
        raise ValueError(f"{name} must be None, a positive int (rows) or a float in (0, 1] (a "
                         f"fraction of the rows), got {capacity!r}")


class PredictionHeadTransform(torch.nn.Module):
    """dense -> activation -> LayerNorm, applied per token (Hugging Face's naming)."""

    def __init__(self, hidden_size, hidden_act="gelu", layer_norm_eps=1e-12, backend=None):
        super().__init__()
        activation(hidden_act)  # validates the name; looked up per call (modules stay picklable)
        self.dense = torch.nn.Linear(hidden_size, hidden_size)
        self.hidden_act = hidden_act
        self.LayerNorm = LayerNorm(hidden_size, eps=layer_norm_eps, backend=backend)

    def forward(self, x):
        return self.LayerNorm(activation(self.hidden_act)(self.dense(x)))


class MaskedLMHead(torch.nn.Module):
    """BERT's masked-LM head with the fused loss.

    forward(hidden, labels=None): without labels, the logits (batch, seq, vocab), as Hugging
    Face's head returns them. With labels (ignore_index where nothing is predicted), the mean
    loss over labelled tokens, computed from the labelled rows only: the transform and the
    projection never see the ~85% of positions whose loss would be thrown away, and the logits
    never exist whole. `return_details=True` gives an LMLossOutput (loss, z_loss, accuracy,
    count). `decoder_weight` ties the decoder to the word embeddings' weight. `capacity`: the
    most labelled rows computed (see `labelled_rows`): set it to compile the head with the work
    of the labelled rows and no host sync; a batch that labels more is an error.
    `accum_dtype=torch.float32` sums a half decoder weight's gradient in fp32 across the loss's
    chunks (see `fusedlm.lm_loss`).
    """

    def __init__(self, hidden_size, vocab_size, *, hidden_act="gelu", layer_norm_eps=1e-12,
                 decoder_weight: Optional[torch.nn.Parameter] = None, ignore_index=-100,
                 label_smoothing=0.0, z_loss=0.0, capacity: Union[int, float, None] = None,
                 accum_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None):
        super().__init__()
        check_capacity(capacity)
        check_accum_dtype(accum_dtype)
        self.capacity = capacity
        self.transform = PredictionHeadTransform(hidden_size, hidden_act, layer_norm_eps, backend)
        self.decoder = torch.nn.Linear(hidden_size, vocab_size, bias=False)
        if decoder_weight is not None:
            if decoder_weight.shape != (vocab_size, hidden_size):
                raise ValueError(f"decoder_weight must have shape ({vocab_size}, {hidden_size}), "
                                 f"got {tuple(decoder_weight.shape)}")
            self.decoder.weight = decoder_weight
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))
        self.decoder.bias = self.bias  # one parameter under both names, as in Hugging Face
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss
        self.accum_dtype, self.backend = accum_dtype, backend

    def forward(self, hidden, labels=None, *, return_details=False):
        if labels is None:
            return self.decoder(self.transform(hidden))
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
        h, y = labelled_rows(hidden, labels, self.ignore_index, self.capacity)
        return lm_loss(self.transform(h), self.decoder.weight, y, self.bias,
                       ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                       z_loss=self.z_loss, return_details=return_details, backend=self.backend,
                       capacity=None if self.capacity is None else y.numel(),
                       accum_dtype=self.accum_dtype)


class LMHead(torch.nn.Linear):
    """nn.Linear(hidden, vocab) whose forward, given labels, returns the fused LM loss.

    forward(hidden, labels=None): without labels, the logits (F.linear). With labels, the
    causal-LM loss (`shift=True`: position t predicts labels[..., t + 1], as GPT-2's
    LMHeadModel computes it) or, with shift=False, the loss of already-aligned labels.
    Swapping it for an existing nn.Linear keeps the same Parameters (see `from_linear`).
    `accum_dtype=torch.float32` sums a half weight's gradient in fp32 across the loss's chunks
    (see `fusedlm.lm_loss`).
    """

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None, *,
                 shift=True, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                 accum_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        check_accum_dtype(accum_dtype)
        self.shift, self.ignore_index = shift, ignore_index
        self.label_smoothing, self.z_loss, self.backend = label_smoothing, z_loss, backend
        self.accum_dtype = accum_dtype

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **kwargs):
        """An LMHead sharing `linear`'s weight and bias Parameters (tying is preserved)."""
        head = cls(linear.in_features, linear.out_features, bias=False, device="meta", **kwargs)
        head.weight = linear.weight
        head.bias = linear.bias
        return head

    def forward(self, hidden, labels=None, *, reduction="mean", return_details=False):
        if labels is None:
            return super().forward(hidden)
        return lm_loss(hidden, self.weight, labels, self.bias, ignore_index=self.ignore_index,
                       reduction=reduction, label_smoothing=self.label_smoothing,
                       z_loss=self.z_loss, shift=self.shift, return_details=return_details,
                       accum_dtype=self.accum_dtype, backend=self.backend)
