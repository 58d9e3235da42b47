"""Tokens and singular forms for the object-counting scorers (CHAIR, AMBER), offline.

Why a rule-based singularizer: the reference scorers lemmatize with NLTK (WordNet data, a
POS tagger) or `pattern.en`, which need data downloads at run time; this project downloads
nothing. `singularize` follows `pattern.en.singularize` (the original CHAIR's choice: every token
singularized, no POS tags) on the nouns that matter: regular plurals, -ies/-ves/-es/-men forms and
irregular plurals of everyday objects, animals and people. Where it differs from the WordNet
lemmatizer with POS tags (the OPERA / Object HalBench variant of CHAIR, AMBER): verb and adjective
forms are never reduced to a noun ("tied" stays "tied", not "tie"; "skiing" stays "skiing", not
"ski"), and no POS filter is applied, so a colour adjective that is also an object word ("an
orange cat") counts as a mention where a tagger would call it JJ (AMBER only; CHAIR's reference
counts every token too).
"""

from __future__ import annotations

import re

#: words, hyphenated words, a clitic ('s, 't) and single punctuation marks, as nltk's
#: word_tokenize splits them closely enough for object matching
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*|'[A-Za-z]+|[^\sA-Za-z0-9]")

_IRREGULAR = {
    "men": "man",
    "children": "child",
    "grandchildren": "grandchild",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "oxen": "ox",
    "dice": "die",
    "cacti": "cactus",
    "fungi": "fungus",
    "knives": "knife",
    "pocketknives": "pocketknife",
    "wives": "wife",
    "lives": "life",
    "leaves": "leaf",
    "shelves": "shelf",
    "wolves": "wolf",
    "calves": "calf",
    "halves": "half",
    "loaves": "loaf",
    "scarves": "scarf",
    "hooves": "hoof",
    "thieves": "thief",
    "buses": "bus",
    "minibuses": "minibus",
    "gases": "gas",
    "lenses": "lens",
    "walruses": "walrus",
    "viruses": "virus",
    "canvases": "canvas",
    "tomatoes": "tomato",
    "potatoes": "potato",
    "heroes": "hero",
    "echoes": "echo",
    "mangoes": "mango",
    "volcanoes": "volcano",
    "quizzes": "quiz",
}
#: words that end like a plural but are singular (or have no singular) and stay as they are
_INVARIANT = {
    "scissors", "species", "series", "news", "pants", "shorts", "jeans", "trousers",
    "christmas", "canvas", "lens", "always", "perhaps", "sometimes", "whereas", "towards",
    "afterwards", "various", "numerous", "previous", "famous", "its", "this", "his", "hers",
    "ours", "yours", "theirs", "physics", "mathematics", "athletics", "gymnastics", "sports",
}  # fmt: skip
#: singular nouns in -ie, whose plural -ies must not become -y
_IE_NOUNS = {
    "tie", "pie", "cookie", "movie", "zombie", "brownie", "hoodie", "selfie", "rookie", "calorie",
    "prairie", "collie", "doggie", "goalie", "veggie", "smoothie", "magpie", "budgie", "birdie",
    "lie", "genie", "necktie", "bowtie", "pixie", "sweetie", "beanie", "lassie",
}  # fmt: skip
#: singular nouns in -che, whose plural -ches loses only the "s"
_CHE_NOUNS = {"headache", "mustache", "moustache", "niche", "cache", "avalanche", "quiche"}
#: singular nouns in -men (not plurals of -man)
_MEN_SINGULAR = {"omen", "amen", "stamen", "specimen", "abdomen", "semen", "regimen", "hymen"}


def tokenize(text: str) -> list[str]:
    """Tokens of `text` (case kept): words, clitics and punctuation marks, in order."""
    return _TOKEN.findall(text)


def is_word(token: str) -> bool:
    """A word token (letters or digits), as opposed to punctuation or a clitic."""
    return token[:1].isalnum()


def singularize(word: str) -> str:
    """The singular of a plural noun; any other word is returned unchanged (case kept)."""
    w = word
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) <= 3 or not w.isalpha() and "-" not in w:
        return w
    if "-" in w:  # "t-shirts" -> "t-shirt": singularize the last part
        head, _, tail = w.rpartition("-")
        return f"{head}-{singularize(tail)}"
    if w in _INVARIANT or w in _MEN_SINGULAR:
        return w
    if w.endswith("men"):  # women, policemen, gentlemen
        return w[:-3] + "man"
    if not w.endswith("s") or w.endswith(("ss", "us", "is", "ous")):
        return w
    if w.endswith("ies"):
        return w[:-1] if w[:-1] in _IE_NOUNS else w[:-3] + "y"
    if w.endswith("ves"):
        return w[:-1]  # gloves, stoves, olives (the -f/-fe ones are irregular above)
    if w.endswith("ches"):
        return w[:-1] if w[:-1] in _CHE_NOUNS else w[:-2]
    if w.endswith(("shes", "xes", "sses", "zzes")):
        return w[:-2]
    return w[:-1]
