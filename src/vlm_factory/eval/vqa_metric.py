"""VQA accuracy as the official VQAv2 evaluation computes it (GT-Vision-Lab/VQA, vqaEval.py on master).

A prediction is scored against ten human answers: for each of the ten leave-one-out subsets of nine,
min(1, matches / 3), averaged. Two modes (`eval.vqa_metric`):
- `official` (the default): the script's logic, quirks included. Tabs and newlines become spaces and
  both sides are stripped; only when the human answers are not all identical are both sides normalised
  (punctuation, then lower case, number words, articles, contractions). So with ten identical human
  answers "Red" does not match "red". Its period stripping removes at most 32 periods (the script passes
  `re.UNICODE`, 32, where `re.sub` takes its count).
- `normalized`: both sides always normalised, for data whose human answers keep raw spellings
  (hub datasets without VQAv2's own cleaning); symmetric, so "Red" matches ten "red".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The script's lookbehind is misspelt as a lookahead, "(?!<=": kept, since it is what scores VQAv2.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_OFFICIAL_PERIOD_COUNT = 32  # re.UNICODE, passed as re.sub's count by the script
VQA_METRICS = ("official", "normalized")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def _strip_whitespace(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """The official normalisation: whitespace, punctuation, then lower case, numbers, articles, contractions."""
    return _process_digit_article(_process_punctuation(_strip_whitespace(answer)))


def vqa_score(prediction: str, human_answers: Sequence[str], mode: str = "official") -> float:
    """Soft accuracy in [0, 1]: mean over leave-one-out subsets of min(1, matches / 3); `mode` in VQA_METRICS."""
    if not human_answers:
        raise ValueError("a VQA question needs at least one human answer")
    if mode == "official":
        pred, gts = _strip_whitespace(prediction), [_strip_whitespace(a) for a in human_answers]
        if len(set(gts)) > 1:
            pred, gts = normalize_answer(pred), [normalize_answer(a) for a in gts]
    elif mode == "normalized":
        pred, gts = normalize_answer(prediction), [normalize_answer(a) for a in human_answers]
    else:
        raise ValueError(f"unknown VQA metric mode {mode!r}; one of {', '.join(VQA_METRICS)}")
    scores = []
    for held_out in range(len(gts)):
        matches = sum(1 for i, gt in enumerate(gts) if i != held_out and gt == pred)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)
