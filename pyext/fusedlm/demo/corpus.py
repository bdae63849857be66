"""The demo's built-in text, generated from a seed: a pretraining corpus and a labelled
sentence-classification task, both with structure a small BERT can learn.

Pretraining corpus: documents, each about one topic and written in that topic's own style, as
real text is (a recipe does not read like a ship's log). A topic's sentences come from its own
templates, whose frame words ("until the ... is", "at dawn the ... began to") only that topic
uses, filled with the topic's nouns, verbs and adjectives. A masked word is predictable from its
sentence (the frame) and from its document (the topic), so masked-LM accuracy climbs far above
chance (1 / vocabulary size). Next-sentence prediction is learnable because a document's
sentences share a style and a topic that a sentence from another document usually does not: the
frame words occur in every sentence, so a two-layer model picks the topic up within a few
hundred steps. Measured on the demo's model (2-core CPU, default settings): with topic nouns
alone and one template set for all topics, next-sentence accuracy stayed at 47-63% after 400
steps (it rose past 90% only near step 1000); with styled topics and BERT's multi-sentence
segments (`data.PretrainingBatches`), 86-93% held out at 400 steps over seeds 0-9.

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
# Each topic's style: templates whose frame words no other topic uses.
STYLES = {
    "kitchen": ("first , {verb} the {noun} until the {noun2} is {adj} .",
                "add {num} {noun}s and {verb} the {noun2} slowly .",
                "serve the {adj} {noun} with the {noun2} ."),
    "harbor": ("at dawn the {noun} began to {verb} beside the {noun2} .",
               "by nightfall {num} {noun}s were ready to {verb} .",
               "aboard , the {adj} {noun} watched the {noun2} ."),
    "garden": ("in spring we {verb} the {noun} beneath the {noun2} .",
               "each morning {num} {noun}s {verb} along the {adj} {noun2} .",
               "our {adj} {noun} grows beside the {noun2} ."),
    "observatory": ("tonight the {noun} will {verb} the {adj} {noun2} overhead .",
                    "through the {noun} , {num} {noun2}s appeared far above .",
                    "we {verb} the {noun} until midnight ."),
    "workshop": ("use the {noun} to {verb} the {adj} {noun2} .",
                 "then {verb} {num} {noun}s onto the {noun2} firmly .",
                 "clamp the {noun} and {verb} it carefully ."),
    "orchestra": ("during rehearsal the {noun} must {verb} with the {noun2} .",
                  "on stage {num} {noun}s {verb} a {adj} melody .",
                  "the audience heard the {adj} {noun} and the {noun2} ."),
}
assert STYLES.keys() == TOPICS.keys()


def sentence(rng: random.Random, topic: str) -> str:
    nouns, verbs, adjs = TOPICS[topic]
    noun, noun2 = rng.sample(nouns, 2)
    return rng.choice(STYLES[topic]).format(adj=rng.choice(adjs), noun=noun, noun2=noun2,
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
