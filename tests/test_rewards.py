"""Checkable rewards: each checker against hand cases, loose scoring, the embedded prompt set."""

import pytest

from jetmoe_ft.evaluation.rewards import (
    INSTRUCTION_PROMPTS,
    REWARDS,
    Check,
    InstructionPrompt,
    check_answer,
    instruction_reward,
    loose_variants,
)

CASES = [
    ("lowercase", {}, "all lower case here.", 1.0),
    ("lowercase", {}, "Not all lower case.", 0.0),
    ("lowercase", {}, "123 !", 0.0),  # no letters: nothing was written in lower case
    ("uppercase", {}, "SHOUTING, 42!", 1.0),
    ("uppercase", {}, "SHOUTING mostly", 0.0),
    ("max_words", {"n": 3}, "one two three", 1.0),
    ("max_words", {"n": 3}, "one two three four", 0.0),
    ("max_words", {"n": 3}, "", 0.0),
    ("min_words", {"n": 3}, "one, two; three", 1.0),
    ("min_words", {"n": 3}, "one two", 0.0),
    ("include_keywords", {"keywords": ["memory", "disk"]}, "Memory and a DISK.", 1.0),
    ("include_keywords", {"keywords": ["memory", "disk"]}, "memory and diskette", 0.0),
    ("exclude_words", {"words": ["war"]}, "A story of peace and warmth.", 1.0),
    ("exclude_words", {"words": ["war"]}, "The War ended.", 0.0),
    ("exclude_words", {"words": ["war"]}, "   ", 0.0),
    ("keyword_frequency", {"keyword": "dog", "n": 2}, "Dog eats; dog sleeps; dogs run.", 1.0),
    ("keyword_frequency", {"keyword": "dog", "n": 3}, "Dog eats; dog sleeps; dogs run.", 0.0),
    ("json_answer", {}, '{"name": "Bot", "age": 3}', 1.0),
    ("json_answer", {}, '```json\n{"answer": 4}\n```', 1.0),
    ("json_answer", {}, "{'name': 'Bot'}", 0.0),
    ("json_answer", {}, "The answer is {}", 0.0),
    ("ends_with", {"phrase": "Have a nice day."}, "Sunny. have a nice day.", 1.0),
    ("ends_with", {"phrase": "Have a nice day."}, "Have a nice day. Bye.", 0.0),
    ("starts_with", {"phrase": "Yes"}, "yes, I do.", 1.0),
    ("starts_with", {"phrase": "Yes"}, "Well, yes.", 0.0),
    ("no_commas", {}, "No commas here.", 1.0),
    ("no_commas", {}, "One, two.", 0.0),
    ("no_commas", {}, "", 0.0),
    ("bullet_points", {"n": 2}, "Tips:\n* sleep\n- eat", 1.0),
    ("bullet_points", {"n": 2}, "* sleep\n* eat\n* run", 0.0),
    ("bullet_points", {"n": 2}, "*sleep\n*eat", 0.0),  # a bullet needs a space after the marker
    ("quoted", {}, ' "Love is patient." ', 1.0),
    ("quoted", {}, '"Love" is patient.', 0.0),
    ("max_sentences", {"n": 1}, "A cat sleeps.", 1.0),
    ("max_sentences", {"n": 1}, "A cat sleeps. It purrs!", 0.0),
    ("max_sentences", {"n": 1}, "A cat. It purrs", 0.0),  # an unfinished last sentence counts
    ("max_sentences", {"n": 2}, "Pi is 3.14 exactly? No.", 1.0),  # a decimal point ends no sentence
    ("title", {}, "<<Rain>>\nDrops fall.", 1.0),
    ("title", {}, "<Rain>\nDrops fall.", 0.0),
]


@pytest.mark.parametrize("name, kwargs, completion, expected", CASES)
def test_each_checker_on_hand_cases(name, kwargs, completion, expected):
    assert REWARDS[name](completion, **kwargs) == expected


def test_every_checker_has_a_passing_and_a_failing_case():
    outcomes = {}
    for name, _, _, expected in CASES:
        outcomes.setdefault(name, set()).add(expected)
    assert {name for name, seen in outcomes.items() if seen == {0.0, 1.0}} == set(REWARDS)


def test_loose_scoring_forgives_a_preamble_and_markdown():
    item = InstructionPrompt("q", (Check("lowercase"), Check("ends_with", {"phrase": "bye."})))
    answer = "Sure! Here it is:\nall lower **case** bye."
    assert check_answer(item, answer) == {"strict": [False, True], "loose": [True, True]}
    assert answer.split("\n")[1].replace("*", "") in loose_variants(answer)
    # nothing rescues an answer that breaks the instruction on every line
    assert check_answer(item, "Hello\nWorld") == {"strict": [False, False], "loose": [False, False]}


def test_instruction_reward_is_the_share_of_checks_passed():
    checks = (Check("lowercase"), Check("max_words", {"n": 2}), Check("no_commas"))
    assert instruction_reward("hi there", checks) == 1.0
    assert instruction_reward("hi, there you", checks) == pytest.approx(1 / 3)
    assert instruction_reward("anything", ()) == 0.0


def test_the_embedded_prompt_set_is_well_formed():
    assert len(INSTRUCTION_PROMPTS) >= 30
    assert len({item.prompt for item in INSTRUCTION_PROMPTS}) == len(INSTRUCTION_PROMPTS)
    used = {check.name for item in INSTRUCTION_PROMPTS for check in item.checks}
    assert used == set(REWARDS)  # every checker is exercised by some prompt
    for item in INSTRUCTION_PROMPTS:
        for check in item.checks:
            assert check("") in (0.0, 1.0)  # the arguments fit the checker's signature
