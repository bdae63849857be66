"""Reference masked-LM / causal-LM loss: the full-logits path, and the per-row math of the fused one.

`lm_loss` is the oracle: it materializes the (tokens x vocab) logits and calls
`F.cross_entropy`, exactly what a Hugging Face head does, plus the z-loss and the accuracy.
Tests run it in float64. `ce_rows` is the per-row math the fused kernels implement (on a chunk of
already-projected logits, loss and gradient in one pass) and serves as the `torch` backend.
"""
import torch
import torch.nn.functional as F


def shift_labels(hidden, labels):
    """Causal LM: position t predicts token t+1. Drops the last position of every sequence."""
    return hidden[..., :-1, :], labels[..., 1:]


def lm_loss(hidden, weight, labels, bias=None, *, ignore_index=-100, reduction="mean",
            label_smoothing=0.0, z_loss=0.0, shift=False):
    """F.cross_entropy(hidden @ weight.T + bias, labels) + z_loss * logsumexp^2, computed in the
    inputs' dtype for the projection and float32 (or float64) for the softmax.

    Returns (loss, details) with details = dict(z_loss=mean z-loss term over labelled rows,
    accuracy=fraction of labelled rows whose argmax is the label, count=labelled rows).
    The mean over zero labelled rows is defined as 0 (torch's F.cross_entropy gives NaN).
    """
    if shift:
        hidden, labels = shift_labels(hidden, labels)
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    wide = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(wide)
    valid = y != ignore_index
    per_row = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none",
                              label_smoothing=label_smoothing)
    lse = torch.logsumexp(logits, dim=-1)
    z_rows = torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    per_row = per_row + z_rows
    count = int(valid.sum())
    denominator = max(count, 1)
    if reduction == "mean":
        loss = per_row.sum() / denominator
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row.view(labels.shape)
    hit = (logits.argmax(-1) == y) & valid
    details = dict(z_loss=(z_rows.sum() / denominator).detach(),
                   accuracy=(hit.sum() / denominator).detach(), count=count)
    return loss, details


def ce_rows(logits, labels, *, label_smoothing, z_loss, grad_scale=None, compute_grad):
    """Per-row loss of already-projected logits (rows, V), all labels valid, in float32.

    Returns (loss, lse, hit) per row as float32; when `compute_grad`, also overwrites `logits`
    with d(sum_i scale_i * loss_i)/d(logits) where grad_scale is a float or a (rows,) tensor.
    Mirrors the fused kernels: one pass for statistics, one writing the gradient in place.
    """
    x = logits.float()
    vocab = x.shape[1]
    lse = torch.logsumexp(x, dim=1)
    x_label = x.gather(1, labels.view(-1, 1)).squeeze(1)
    loss = (1.0 - label_smoothing) * (lse - x_label)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - x.mean(1))
    loss = loss + z_loss * lse * lse
    hit = (x.argmax(1) == labels).float()
    if compute_grad:
        # g = scale * (softmax * (1 + 2 z lse) - smoothing / V - (1 - smoothing) * onehot),
        # built in place in x (which is `logits` itself for float32 input: no extra (rows, V)
        # buffers, as this is also the CPU's production path).
        scale = grad_scale if isinstance(grad_scale, torch.Tensor) else torch.full_like(lse, grad_scale)
        x.sub_(lse[:, None]).exp_().mul_(((1.0 + 2.0 * z_loss * lse) * scale)[:, None])
        if label_smoothing:
            x.sub_((label_smoothing / vocab) * scale[:, None])
        x.scatter_add_(1, labels.view(-1, 1), ((label_smoothing - 1.0) * scale)[:, None])
        if x.data_ptr() != logits.data_ptr():
            logits.copy_(x)
    return loss, lse, hit
