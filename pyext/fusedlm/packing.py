"""Packed batches with static shapes: every training step the same number of tokens and of
sequence slots, no token spent on padding, so that one compiled graph (and one CUDA graph)
serves the whole run.

    sampler = PackedBatchSampler(lengths, tokens=16384, max_sequences=64, max_seqlen=512)
    loader = DataLoader(dataset, batch_sampler=sampler,
                        collate_fn=PackingCollator(tokens=16384, max_sequences=64, max_seqlen=512))
    for batch in loader:                  # input_ids (16384,), cu_seqlens (65,), max_seqlen 512...
        loss = model(**batch).loss        # fusedlm.models.BertForPreTraining, GPTForCausalLM, ...

`PackedBatchSampler` groups a dataset's samples (by their lengths) into steps that fit the
budget; `PackingCollator` lays a step out. Hugging Face's Trainer batches a dataset itself:
give it `PackedSteps(dataset, sampler)` (a dataset of whole steps) with
`per_device_train_batch_size=1` and the collator. A sample is a dict: `input_ids` (a list or 1-D
tensor); optionally `token_type_ids` and per-token `labels` (masked LM, causal LM: as long as
input_ids); per-sequence values (`next_sentence_label`, a classification `labels`) as scalars.
The tokens a step's samples leave unused form filler sequences of `pad_token_id` (each at most
max_seqlen long, labels ignored); unused slots are empty sequences (cu_seqlens repeats its last
offset) whose per-sequence labels are ignored.
"""
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100


def _check_budget(tokens, max_sequences, max_seqlen):
    for name, v in (("tokens", tokens), ("max_sequences", max_sequences), ("max_seqlen", max_seqlen)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    need = 1 + math.ceil(tokens / max_seqlen)
    if max_sequences < need:
        raise ValueError(f"max_sequences must be at least {need} (one sample plus the filler "
                         f"sequences of at most max_seqlen={max_seqlen} that a {tokens}-token step "
                         f"may need), got {max_sequences}")


def _slots_needed(samples, used, tokens, max_seqlen):
    return samples + math.ceil((tokens - used) / max_seqlen)


class PackedBatchSampler(torch.utils.data.Sampler):
    """Yields lists of dataset indices, each a step whose samples fit `tokens` tokens and
    `max_sequences` slots (with room for the filler sequences of what they leave unused).
    Samples are taken in order (shuffled per epoch with `seed + epoch` when `shuffle`), a step
    closing when the next sample does not fit. With `num_replicas` > 1 (DDP, FSDP) each rank
    gets every num_replicas-th step, all ranks the same number (the last steps that do not make
    a full round are dropped). `set_epoch` as DistributedSampler."""

    def __init__(self, lengths: Sequence[int], tokens: int, max_sequences: int, max_seqlen: int,
                 *, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        _check_budget(tokens, max_sequences, max_seqlen)
        self.lengths = [int(n) for n in lengths]
        for i, n in enumerate(self.lengths):
            if not 1 <= n <= min(max_seqlen, tokens):
                raise ValueError(f"lengths[{i}] = {n}: every sample needs 1 to max_seqlen="
                                 f"{min(max_seqlen, tokens)} tokens (truncate or split it first)")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.tokens, self.max_sequences, self.max_seqlen = tokens, max_sequences, max_seqlen
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _steps(self):
        order = list(range(len(self.lengths)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        steps, step, used = [], [], 0
        for i in order:
            n = self.lengths[i]
            fits = (used + n <= self.tokens and
                    _slots_needed(len(step) + 1, used + n, self.tokens, self.max_seqlen)
                    <= self.max_sequences)
            if not fits:
                steps.append(step)
                step, used = [], 0
            step.append(i)
            used += n
        if step:
            steps.append(step)
        rounds = len(steps) // self.num_replicas
        return steps[:rounds * self.num_replicas][self.rank::self.num_replicas]

    def __iter__(self):
        return iter(self._steps())

    def __len__(self):
        return len(self._steps())


class PackedSteps(torch.utils.data.Dataset):
    """A dataset whose items are whole steps (lists of samples), grouped by `sampler`: for
    loaders that batch by count, as Hugging Face's Trainer does (batch size 1, the collator
    unwraps the step). The grouping is the sampler's at construction (its epoch then)."""

    def __init__(self, dataset, sampler: PackedBatchSampler):
        self.dataset, self.steps = dataset, list(sampler)

    def __len__(self):
        return len(self.steps)

    def __getitem__(self, i):
        return [self.dataset[j] for j in self.steps[i]]


class PackingCollator:
    """Lays out one step's samples (see the module docstring) as a static-shape packed batch:
    input_ids and token_type_ids (tokens,), cu_seqlens (max_sequences + 1,) int32,
    max_seqlen (an int), labels (tokens,) or (max_sequences,), next_sentence_label
    (max_sequences,): the keyword arguments fusedlm's models take."""

    def __init__(self, tokens: int, max_sequences: int, max_seqlen: int, pad_token_id: int = 0):
        _check_budget(tokens, max_sequences, max_seqlen)
        self.tokens, self.max_sequences, self.max_seqlen = tokens, max_sequences, max_seqlen
        self.pad_token_id = pad_token_id

    def __call__(self, samples: List[Dict]) -> Dict[str, object]:
        if len(samples) == 1 and isinstance(samples[0], list):  # one step of PackedSteps
            samples = samples[0]
        if not samples:
            raise ValueError("samples must hold at least one sample")
        ids = [torch.as_tensor(s["input_ids"], dtype=torch.long).reshape(-1) for s in samples]
        lens = [t.numel() for t in ids]
        used = sum(lens)
        if min(lens) < 1 or max(lens) > self.max_seqlen:
            raise ValueError(f"samples: every input_ids needs 1 to max_seqlen={self.max_seqlen} "
                             f"tokens, got lengths {lens}")
        if used > self.tokens or _slots_needed(len(samples), used, self.tokens,
                                                self.max_seqlen) > self.max_sequences:
            raise ValueError(f"samples do not fit one step: {len(samples)} samples of {used} tokens "
                             f"against tokens={self.tokens}, max_sequences={self.max_sequences} "
                             "(group them with PackedBatchSampler)")
        fill = self.tokens - used
        filler = [self.max_seqlen] * (fill // self.max_seqlen) + ([fill % self.max_seqlen]
                                                                  if fill % self.max_seqlen else [])
        seq_lens = lens + filler
        cu = torch.zeros(self.max_sequences + 1, dtype=torch.int32)
        cu[1:len(seq_lens) + 1] = torch.tensor(seq_lens).cumsum(0)
        cu[len(seq_lens) + 1:] = self.tokens
        pad = torch.full((fill,), self.pad_token_id, dtype=torch.long)
        # No position_ids: the models count them from cu_seqlens (RoBERTa from pad_token_id + 1).
        batch = {"input_ids": torch.cat(ids + [pad]), "cu_seqlens": cu, "max_seqlen": self.max_seqlen}
        if any("token_type_ids" in s for s in samples):
            batch["token_type_ids"] = self._per_token(samples, "token_type_ids", lens, 0)
        for key in sorted({k for s in samples for k in s} - {"input_ids", "token_type_ids"}):
            if any(key not in s for s in samples):
                raise ValueError(f"samples: '{key}' is in some samples and not in others")
            first = torch.as_tensor(samples[0][key])
            if first.dim() == 0:  # one value per sequence: a slot per sample, the rest ignored
                values = torch.full((self.max_sequences,), IGNORE_INDEX, dtype=torch.long)
                values[:len(samples)] = torch.stack([torch.as_tensor(s[key]) for s in samples])
                batch[key] = values
            else:
                batch[key] = self._per_token(samples, key, lens, IGNORE_INDEX)
        return batch

    def _per_token(self, samples, key, lens, fill_value):
        parts = []
        for i, (s, n) in enumerate(zip(samples, lens)):
            t = torch.as_tensor(s.get(key, [fill_value] * n), dtype=torch.long).reshape(-1)
            if t.numel() != n:
                raise ValueError(f"samples[{i}]['{key}'] must have input_ids' length {n}, got {t.numel()}")
            parts.append(t)
        parts.append(torch.full((self.tokens - sum(lens),), fill_value, dtype=torch.long))
        return torch.cat(parts)
