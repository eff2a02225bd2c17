"""Answer normalisation of the official VQA evaluation (the ``VQAEval`` used by LAVIS), as pure functions.

Two steps, applied in this order to a prediction:

``process_punctuation``
    * Every character of ``PUNCTUATION`` is *deleted* when the original text has that character next to a space
      (``"p "`` or ``" p"``) or when the original text contains a comma between two digits anywhere
      (``"1,000"``); otherwise it is *replaced by a space*. Both tests look at the original text, not at the text
      being edited, exactly as the reference does.
    * Then a period is deleted unless a digit follows it (``"3.5"`` keeps its period, ``"yes."`` loses it). The
      reference passes ``re.UNICODE`` (= 32) positionally as ``count``, so at most 32 periods are deleted; kept.

``process_digit_article``
    lower-case, split on whitespace, map number words ("none", "zero" ... "ten") to digits, drop the articles
    a / an / the, then fix missing apostrophes with the contractions table, and join with single spaces.

Ground-truth answers get only ``process_punctuation``, and only when the annotators disagree (see
``ukmp.eval.metrics.vqa_accuracy``).
"""

from __future__ import annotations

import re

PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

# "written form>fixed form" pairs of the official table, including its oddities (keys with capitals can never match
# after lower-casing; "somebody'd" maps to "somebodyd"). Kept verbatim in content so scores match the reference.
_CONTRACTION_PAIRS = """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've couldnt've>couldn't've
didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've hadn'tve>hadn't've hasnt>hasn't
havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's howd>how'd howll>how'll hows>how's Id've>I'd've
I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am
mightnt>mightn't mightnt've>mightn't've mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've
neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at 'ow'sat>'ow's'at
shant>shan't shed've>she'd've she'dve>she'd've she's>she's shouldve>should've shouldnt>shouldn't
shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd somebodyd've>somebody'd've
somebody'dve>somebody'd've somebodyll>somebody'll somebodys>somebody's someoned>someone'd
someoned've>someone'd've someone'dve>someone'd've someonell>someone'll someones>someone's somethingd>something'd
somethingd've>something'd've something'dve>something'd've somethingll>something'll thats>that's thered>there'd
thered've>there'd've there'dve>there'd've therere>there're theres>there's theyd>they'd theyd've>they'd've
they'dve>they'd've theyll>they'll theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've
we'dve>we'd've weve>we've werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've whens>when's
whered>where'd wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll
whos>who's whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've wouldnt>wouldn't
wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll yall'd've>y'all'd've
y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've you'dve>you'd've youll>you'll
youre>you're youve>you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split(">", 1) for pair in _CONTRACTION_PAIRS.split())

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The reference pattern starts with "(?!<=\d)", a negative *lookahead* for the literal text "<=" + digit (meant as a
# lookbehind). At the position of a "." it can never match, so it is a no-op: only "not followed by a digit" counts.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = 32  # the reference's accidental count=re.UNICODE


def process_punctuation(text: str) -> str:
    """Delete or space out punctuation as the official VQA evaluation does (see the module docstring)."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if delete_all or (p + " " in text) or (" " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """Lower-case; number words to digits; drop articles; restore apostrophes; single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def clean_whitespace(text: str) -> str:
    """Newlines and tabs become spaces, then the ends are stripped (first step of the reference on predictions)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full normalisation of a predicted answer: whitespace, punctuation, then digits/articles/contractions."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


# --------------------------------------------------------------------------------------------- OK-VQA lemmatiser
LEMMATIZED_POS: frozenset[str] = frozenset({"NOUN", "VERB"})
SPACY_MODEL = "en_core_web_sm"


def lemmatize_answers(answers: list[str], nlp) -> list[str]:
    """LAVIS's OK-VQA post-processing of predicted answers: every token that ``nlp`` (a spaCy pipeline, or any
    callable returning tokens with ``text``, ``lemma_`` and ``pos_``) tags NOUN or VERB becomes its lemma, the
    others stay as written; tokens are joined with single spaces."""
    return [" ".join(t.lemma_ if t.pos_ in LEMMATIZED_POS else t.text for t in nlp(a)) for a in answers]


def load_lemmatizer():
    """``(nlp, None)`` when spaCy and its English model are installed (the ``okvqa`` extra), else ``(None, why)``;
    never downloads anything."""
    try:
        import spacy  # noqa: PLC0415
    except ImportError:
        return None, "not applied: spaCy is not installed (pip install 'ukmp[okvqa]')"
    try:
        return spacy.load(SPACY_MODEL), None
    except OSError:
        return None, f"not applied: the spaCy model {SPACY_MODEL} is not installed"
