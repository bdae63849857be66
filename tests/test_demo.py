"""The demo's data: a generated corpus with the promised structure, BERT's masking and
next-sentence rules, and batches that split exactly across processes."""
import pytest
import torch

from fusedlm.demo import corpus
from fusedlm.demo.data import CLS, MASK, PAD, SEP, SPECIAL, ClassificationBatches, PretrainingBatches

pytest.importorskip("tokenizers")
from fusedlm.demo.data import encode, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def data():
    docs = corpus.generate_documents(300, seed=3)
    tok = train_tokenizer([s for d in docs for s in d], 300)
    enc = [encode(tok, d) for d in docs]
    return tok, PretrainingBatches(enc, tok.get_vocab_size(), 48, seed=5)


def test_tokenizer_is_the_same_in_every_process():
    """The same text gives the same vocabulary and ids in separate processes (the tokenizers
    library's own trainer did not: its ties fall in a per-process random order)."""
    import subprocess
    import sys
    code = ("from fusedlm.demo import corpus; from fusedlm.demo.data import train_tokenizer; "
            "docs = corpus.generate_documents(300, seed=3); "
            "print(train_tokenizer([s for d in docs for s in d], 120).to_str())")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(__import__("os").environ, PYTHONHASHSEED=str(seed))).stdout
            for seed in (1, 2)]
    assert outs[0] == outs[1] and len(outs[0]) > 1000


def test_tokenizer_keeps_frequent_words_whole_and_never_loses_a_character():
    docs = corpus.generate_documents(300, seed=3)
    texts = [s for d in docs for s in d]
    tok = train_tokenizer(texts, 1000)
    words = {w for t in texts for w in t.split()}
    assert tok.get_vocab_size() < 1000 and all(w in tok.get_vocab() for w in words)
    small = train_tokenizer(texts, 80)  # characters and a few words: the rest in pieces
    assert small.get_vocab_size() == 80
    for t in texts[:50]:
        enc = small.encode(t)
        assert "[UNK]" not in enc.tokens
        assert "".join(p.removeprefix("##") for p in enc.tokens) == t.replace(" ", "")
    with pytest.raises(ValueError, match="vocab_size 20 is too small"):
        train_tokenizer(texts, 20)


def test_corpus_is_a_function_of_the_seed():
    assert corpus.generate_documents(20, seed=1) == corpus.generate_documents(20, seed=1)
    assert corpus.generate_documents(20, seed=1) != corpus.generate_documents(20, seed=2)


def test_each_topic_writes_in_its_own_style():
    """The next-sentence signal: frame words that only one topic's templates use."""
    frames = {t: {w for tpl in tpls for w in tpl.split() if "{" not in w} for t, tpls in corpus.STYLES.items()}
    for t, words in frames.items():
        others = set().union(*(w for u, w in frames.items() if u != t))
        assert len(words - others) >= 5, (t, words - others)
    rng = __import__("random").Random(0)
    for topic in corpus.TOPICS:
        for _ in range(20):
            words = corpus.sentence(rng, topic).split()
            assert any(set(words) >= frames[topic] & set(tpl.split()) for tpl in corpus.STYLES[topic])


def test_segments_follow_bert_next_sentence_rule():
    """A is consecutive sentences of one document; B is what follows A in that document (label 0)
    or a run of another document (label 1); together they fit the length."""
    import random
    # token = 1000 * document + 10 * sentence + word: every token says where it came from
    docs = [[[1000 * d + 10 * s + w for w in range(1 + (d + s) % 4)] for s in range(2 + d % 5)]
            for d in range(40)]
    pre = PretrainingBatches(docs, 50_000, 16, seed=0)
    rng = random.Random(0)
    labels = []
    for _ in range(2000):
        a, b, nsp = pre.segments(rng)
        sents = lambda seg: sorted({(t // 1000, t % 1000 // 10) for t in seg})  # noqa: E731
        sa, sb = sents(a), sents(b)
        assert len({d for d, _ in sa}) == 1 and len({d for d, _ in sb}) == 1
        assert [s for _, s in sa] == list(range(sa[0][1], sa[-1][1] + 1))  # consecutive
        assert [s for _, s in sb] == list(range(sb[0][1], sb[-1][1] + 1))
        if nsp == 0:
            assert sb[0] == (sa[0][0], sa[-1][1] + 1), (sa, sb)
        else:
            assert sb[0][0] != sa[0][0]
        labels.append(nsp)
        ids, types, _, _ = pre.example(rng)
        assert len(ids) <= 16 and len(types) == len(ids)
    assert 0.45 < sum(labels) / len(labels) < 0.55


def test_review_labels_are_polarity_flipped_by_not():
    for text, label in corpus.generate_reviews(400, seed=0):
        words = text.split()
        positive = any(w in corpus.POSITIVE for w in words)
        assert label == int(positive != ("not" in words)), text


def test_masking_and_next_sentence_rules(data):
    tok, pre = data
    b = pre.batch(0, 512, "cpu")
    ids, mask, types, labels = b["input_ids"], b["attention_mask"], b["token_type_ids"], b["labels"]
    real = mask.bool()
    assert torch.all(ids[:, 0] == CLS) and torch.all(ids[~real] == PAD)
    assert torch.all((ids == SEP).sum(1) == 2) and torch.all(types[~real] == 0)
    chosen = labels != -100
    assert torch.all(labels[chosen] >= len(SPECIAL))  # never a special token
    words = real & (ids >= len(SPECIAL)) | chosen
    rate = chosen.sum() / words.sum()
    assert 0.13 < rate < 0.18, rate
    masked = (ids[chosen] == MASK).float().mean()
    kept = (ids[chosen] == labels[chosen]).float().mean()
    assert 0.75 < masked < 0.85 and 0.06 < kept < 0.16, (masked, kept)
    assert 0.4 < b["next_sentence_label"].float().mean() < 0.6
    assert ids.shape[1] <= 48


def test_each_process_takes_its_slice_of_the_global_batch(data):
    _, pre = data
    whole = pre.batch(7, 8, "cpu")
    parts = [pre.batch(7, 8, "cpu", rank=r, world=2) for r in range(2)]
    for r, part in enumerate(parts):
        width = part["input_ids"].shape[1]
        assert torch.equal(part["input_ids"], whole["input_ids"][r::2, :width])
        assert torch.equal(part["next_sentence_label"], whole["next_sentence_label"][r::2])
    assert not torch.equal(pre.batch(8, 8, "cpu")["input_ids"], whole["input_ids"])


def test_classification_batches_cover_the_set_in_order():
    rows = [[10 + i] * (i % 5 + 1) for i in range(10)]
    batches = list(ClassificationBatches(rows, [i % 2 for i in range(10)], 8, seed=0).all(4, "cpu"))
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["labels"] for b in batches]), torch.tensor([i % 2 for i in range(10)]))
    assert batches[0]["input_ids"][1].tolist()[:4] == [CLS, 11, 11, SEP]


def test_a_corpus_file_needs_documents_of_two_sentences(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("a b c\n\nd e f\n")
    with pytest.raises(ValueError, match="no document with 2 or more"):
        corpus.read_documents(str(f))
    f.write_text("one .\ntwo .\n\n\nthree .\nfour .\nfive .\n")
    assert corpus.read_documents(str(f)) == [["one .", "two ."], ["three .", "four .", "five ."]]
