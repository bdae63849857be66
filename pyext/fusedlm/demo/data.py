"""Tokenizer and batches for the demo: a WordPiece tokenizer built on the fly (the `tokenizers`
library's model, a deterministic vocabulary), BERT's masked-LM + next-sentence examples, and
classification batches.

Every batch is a pure function of (seed, step), so the fused and the reference run see the same
batches, and under torch.distributed each rank takes its slice of the same global batch.
"""
import random
from typing import List, Sequence

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(len(SPECIAL))


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A lower-casing BERT WordPiece tokenizer for `texts`, the same in every process: the
    special tokens, every character seen (alone and as a "##" continuation, so nothing is ever
    [UNK]), then the most frequent words whole (ties in alphabetical order) up to
    `vocab_size`; a rarer word is split greedily into the longest pieces in the vocabulary, as
    WordPiece does. (The `tokenizers` library's trainer breaks ties between equally frequent
    merges in a per-process random order, so the same corpus and seed gave different
    vocabularies, and different results, from run to run.)"""
    try:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    except ImportError as e:  # the demo's dependencies are an extra: say which
        raise RuntimeError("fusedlm pretrain needs the `tokenizers` library: "
                           "pip install 'fusedlm[demo]'") from e
    from collections import Counter
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts
                    for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    vocab = SPECIAL + chars + ["##" + c for c in chars]
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for this text: its special tokens "
                         f"and characters alone take {len(vocab)}")
    known = set(vocab)
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) == vocab_size:
            break
        if w not in known:
            vocab.append(w)
            known.add(w)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    return tok


def encode(tok, texts: Sequence[str]) -> List[List[int]]:
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]


def _pad(rows, device):
    """rows of (ids, token types, labels) -> padded (ids, mask, token types, labels) tensors."""
    width = max(len(r[0]) for r in rows)
    out = torch.zeros(4, len(rows), width, dtype=torch.long)
    out[3].fill_(-100)
    for i, (ids, types, labels) in enumerate(rows):
        n = len(ids)
        out[0, i, :n] = torch.tensor(ids)
        out[1, i, :n] = 1
        out[2, i, :n] = torch.tensor(types)
        out[3, i, :n] = torch.tensor(labels)
    return [t.to(device) for t in out]


class PretrainingBatches:
    """BERT's pretraining examples from encoded documents: [CLS] A [SEP] B [SEP], where A is a
    run of consecutive sentences of one document and B is either the run that follows it
    (label 0, as Hugging Face) or a run from another document (label 1), half of the time
    each, together filling up to `max_len` as BERT's data pipeline fills its sequences: more
    text per segment carries more of its document's topic and gives the masked LM more tokens
    a step. A takes sentences while they fit in half the length (at least one); B takes whole
    sentences while they fit (at least one); the longer of the two is truncated if one
    sentence overflows. 15% of the tokens of A and B are chosen for prediction, of which 80%
    become [MASK], 10% a random token and 10% stay."""

    def __init__(self, docs: List[List[List[int]]], vocab_size: int, max_len: int, seed: int,
                 mask_prob: float = 0.15):
        self.docs = [d for d in docs if len(d) >= 2]
        if len(self.docs) < 2:
            raise ValueError("the corpus needs at least two documents of two or more sentences")
        if max_len < 5:
            raise ValueError(f"max_len must be at least 5 ([CLS] A [SEP] B [SEP]), got {max_len}")
        self.vocab_size, self.max_len, self.seed, self.mask_prob = vocab_size, max_len, seed, mask_prob

    def segments(self, rng: random.Random):
        """(A, B, next-sentence label) as token lists, before truncation."""
        budget = self.max_len - 3
        d = rng.randrange(len(self.docs))
        doc = self.docs[d]
        j = rng.randrange(len(doc) - 1)  # A starts at j and leaves at least one sentence after it
        a, k = list(doc[j]), j + 1
        while k < len(doc) - 1 and len(a) + len(doc[k]) <= budget // 2:
            a += doc[k]
            k += 1
        if rng.random() < 0.5:
            src, start, nsp = doc, k, 0
        else:
            other = rng.randrange(len(self.docs) - 1)
            src = self.docs[other + (other >= d)]
            start, nsp = rng.randrange(len(src)), 1
        b = []
        for sent in src[start:]:
            if b and len(a) + len(b) + len(sent) > budget:
                break
            b += sent
        return a, b, nsp

    def example(self, rng: random.Random):
        a, b, nsp = self.segments(rng)
        budget = self.max_len - 3
        while len(a) + len(b) > budget:  # one overlong sentence: truncate the longer, as BERT
            (a if len(a) > len(b) else b).pop()
        ids = [CLS] + a + [SEP] + b + [SEP]
        types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        labels = [-100] * len(ids)
        candidates = [i for i, t in enumerate(ids) if t >= len(SPECIAL)]
        chosen = [i for i in candidates if rng.random() < self.mask_prob] or [rng.choice(candidates)]
        for i in chosen:
            labels[i] = ids[i]
            r = rng.random()
            if r < 0.8:
                ids[i] = MASK
            elif r < 0.9:
                ids[i] = rng.randrange(len(SPECIAL), self.vocab_size)
        return ids, types, labels, nsp

    def batch(self, step: int, size: int, device, rank: int = 0, world: int = 1):
        """The `step`-th global batch of `size` examples; this rank's slice of it."""
        rng = random.Random(self.seed * 1_000_003 + step)
        examples = [self.example(rng) for _ in range(size)]
        mine = examples[rank::world]
        ids, mask, types, labels = _pad([e[:3] for e in mine], device)
        return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                    next_sentence_label=torch.tensor([e[3] for e in mine], device=device))


class ClassificationBatches:
    """[CLS] text [SEP] with a class label; batches drawn with replacement from the set."""

    def __init__(self, encoded: List[List[int]], labels: List[int], max_len: int, seed: int):
        self.rows = [([CLS] + ids[:max_len - 2] + [SEP]) for ids in encoded]
        self.labels, self.seed = labels, seed

    def _make(self, idx, device):
        ids, mask, types, _ = _pad([(self.rows[i], [0] * len(self.rows[i]), [-100] * len(self.rows[i]))
                                    for i in idx], device)
        return dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                    labels=torch.tensor([self.labels[i] for i in idx], device=device))

    def batch(self, step: int, size: int, device, rank: int = 0, world: int = 1):
        rng = random.Random(self.seed * 1_000_003 + step)
        idx = [rng.randrange(len(self.rows)) for _ in range(size)]
        return self._make(idx[rank::world], device)

    def all(self, size: int, device):
        """The whole set in order, in batches of `size` (for evaluation)."""
        for s in range(0, len(self.rows), size):
            yield self._make(range(s, min(s + size, len(self.rows))), device)
