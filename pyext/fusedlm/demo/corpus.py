"""The demo's built-in text, generated from a seed: a pretraining corpus and a labelled
sentence-classification task, both with structure a small BERT can learn.

Pretraining corpus: documents, each about one topic. A sentence is drawn from a handful of
templates (determiners, number agreement, prepositions) filled with that topic's nouns, verbs and
adjectives, so a masked word is predictable from its sentence (grammar) and from its document
(topic): masked-LM accuracy climbs far above chance (1 / vocabulary size). Consecutive sentences
share a topic and random ones usually do not, so next-sentence prediction is learnable too.

Classification task: short reviews, "the <noun> was [not] [very] <adjective> .", labelled
positive or negative. The label is the adjective's polarity, flipped by "not", so a bag of words
cannot solve it and the model has to read the sentence.
"""
import random

TOPICS = {
    "kitchen": (["cook", "knife", "oven", "pot", "spoon", "bowl", "baker", "kettle", "plate", "stove"],
                ["stir", "bake", "chop", "boil", "slice", "pour", "taste", "roast"],
                ["hot", "salty", "sweet", "crisp", "fresh", "greasy"]),
    "harbor": (["ship", "sailor", "dock", "anchor", "wave", "captain", "rope", "harbor", "gull", "crane"],
               ["sail", "anchor", "load", "tow", "moor", "steer", "drift", "signal"],
               ["salty", "stormy", "calm", "wooden", "rusty", "foggy"]),
    "garden": (["gardener", "rose", "shovel", "seed", "hedge", "tulip", "bee", "fence", "root", "pond"],
               ["plant", "water", "prune", "dig", "bloom", "grow", "weed", "rake"],
               ["green", "muddy", "sunny", "tall", "wild", "fragrant"]),
    "observatory": (["telescope", "star", "planet", "comet", "astronomer", "lens", "moon", "orbit", "galaxy", "dome"],
                    ["observe", "measure", "track", "chart", "focus", "rotate", "record", "scan"],
                    ["distant", "bright", "faint", "dark", "cosmic", "silent"]),
    "workshop": (["carpenter", "hammer", "saw", "plank", "nail", "chisel", "bench", "drill", "clamp", "glue"],
                 ["build", "carve", "sand", "drill", "join", "polish", "measure", "repair"],
                 ["sturdy", "rough", "smooth", "heavy", "dusty", "sharp"]),
    "orchestra": (["violin", "drum", "conductor", "flute", "cello", "singer", "choir", "piano", "trumpet", "score"],
                  ["play", "tune", "rehearse", "perform", "conduct", "sing", "practice", "bow"],
                  ["loud", "soft", "graceful", "lively", "solemn", "harmonic"]),
}
NUMBERS = ["two", "three", "four", "five", "six", "seven"]
POSITIVE = ["good", "great", "excellent", "wonderful", "pleasant", "delightful", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "terrible", "dreadful", "poor", "boring", "horrible", "nasty"]
_TEMPLATES = (
    "the {adj} {noun} will {verb} the {noun2} .",
    "a {noun} can {verb} {num} {noun2}s by the {noun3} .",
    "every day the {noun} and the {noun2} {verb} together .",
    "one {adj} {noun} was near the {noun2} , and {num} {noun3}s were under it .",
    "why does the {noun} {verb} the {adj} {noun2} ?",
    "they {verb} the {noun} with a {adj} {noun2} .",
)


def sentence(rng: random.Random, topic: str) -> str:
    nouns, verbs, adjs = TOPICS[topic]
    n = rng.sample(nouns, 3)
    return rng.choice(_TEMPLATES).format(adj=rng.choice(adjs), noun=n[0], noun2=n[1], noun3=n[2],
                                         verb=rng.choice(verbs), num=rng.choice(NUMBERS))


def review(rng: random.Random):
    """(text, label): label 1 = positive."""
    nouns = TOPICS[rng.choice(sorted(TOPICS))][0]
    positive = rng.random() < 0.5
    negated = rng.random() < 0.5
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    text = f"the {rng.choice(nouns)} was {'not ' if negated else ''}{'very ' if rng.random() < 0.3 else ''}{adj} ."
    return text, int(positive != negated)


def generate_documents(n_docs: int, seed: int = 0, sentences=(4, 9)):
    """n_docs documents (lists of sentences), each on one topic; one in six is a run of reviews,
    so the task's words are in the pretraining text too."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        count = rng.randint(*sentences)
        if i % 6 == 5:
            docs.append([review(rng)[0] for _ in range(count)])
        else:
            topic = rng.choice(sorted(TOPICS))
            docs.append([sentence(rng, topic) for _ in range(count)])
    return docs


def generate_reviews(n: int, seed: int = 1):
    rng = random.Random(seed)
    return [review(rng) for _ in range(n)]


def read_documents(path: str, min_sentences: int = 2):
    """A text file as documents: one sentence (or line) per line, documents separated by blank
    lines. Documents with fewer than `min_sentences` lines are dropped (next-sentence pairs
    need two)."""
    docs, cur = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                cur.append(line)
            else:
                if cur:
                    docs.append(cur)
                cur = []
    if cur:
        docs.append(cur)
    docs = [d for d in docs if len(d) >= min_sentences]
    if not docs:
        raise ValueError(f"--corpus {path}: no document with {min_sentences} or more non-empty "
                         "lines (documents are separated by blank lines)")
    return docs
