"""Checkable rewards: instructions whose result a program can verify (IFEval-style), and a prompt set using them.

Every checker is a reward function `(completion: str, **kwargs) -> float`, 1.0 when the completion follows
the instruction and 0.0 when not, so `eval-gen` scores instruction following with them and a GRPO recipe
can name them as rewards (`REWARDS["max_words"](completion, n=20)`). `INSTRUCTION_PROMPTS` is the embedded
set of prompts, each with the checks its instructions imply. Strict scoring checks the answer as written;
loose scoring (Zhou et al. 2023, IFEval) also accepts it with the first and/or last line dropped, or with
markdown asterisks removed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Reward = Callable[..., float]

_WORD = re.compile(r"\b\w+\b")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def _score(passed: bool) -> float:
    return 1.0 if passed else 0.0


def lowercase(completion: str) -> float:
    """Only lower-case letters (and at least one letter)."""
    return _score(any(c.isalpha() for c in completion) and completion == completion.lower())


def uppercase(completion: str) -> float:
    """Only capital letters (and at least one letter)."""
    return _score(any(c.isalpha() for c in completion) and completion == completion.upper())


def max_words(completion: str, n: int) -> float:
    """At most `n` words (and at least one)."""
    return _score(0 < len(_words(completion)) <= n)


def min_words(completion: str, n: int) -> float:
    """At least `n` words."""
    return _score(len(_words(completion)) >= n)


def include_keywords(completion: str, keywords: list[str]) -> float:
    """Every keyword appears as a whole word, any case."""
    return _score(all(_contains_word(completion, word) for word in keywords))


def exclude_words(completion: str, words: list[str]) -> float:
    """None of `words` appears as a whole word, any case (and the answer is not empty)."""
    return _score(bool(completion.strip()) and not any(_contains_word(completion, word) for word in words))


def keyword_frequency(completion: str, keyword: str, n: int) -> float:
    """`keyword` appears at least `n` times as a whole word, any case."""
    return _score(len(re.findall(rf"\b{re.escape(keyword)}\b", completion, re.IGNORECASE)) >= n)


def json_answer(completion: str) -> float:
    """The whole answer is one JSON value (a ```json fence around it is allowed)."""
    text = completion.strip()
    fenced = _FENCE.match(text)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return 0.0
    return 1.0


def ends_with(completion: str, phrase: str) -> float:
    """The answer ends with `phrase` exactly (any case), nothing after it."""
    return _score(completion.strip().strip('"').lower().endswith(phrase.strip().lower()))


def starts_with(completion: str, phrase: str) -> float:
    """The answer begins with `phrase` (any case)."""
    return _score(completion.strip().strip('"').lower().startswith(phrase.strip().lower()))


def no_commas(completion: str) -> float:
    """No comma anywhere (and the answer is not empty)."""
    return _score(bool(completion.strip()) and "," not in completion)


def bullet_points(completion: str, n: int) -> float:
    """Exactly `n` markdown bullet lines (`* ` or `- `)."""
    bullets = [line for line in completion.splitlines() if re.match(r"^\s*[*-]\s", line)]
    return _score(len(bullets) == n)


def quoted(completion: str) -> float:
    """The whole answer is wrapped in double quotes."""
    text = completion.strip()
    return _score(len(text) > 1 and text[0] == '"' and text[-1] == '"')


def max_sentences(completion: str, n: int) -> float:
    """At most `n` sentences (ended by . ! or ?; a trailing unfinished one counts), at least one."""
    text = completion.strip()
    if not text:
        return 0.0
    ends = _SENTENCE_END.findall(text)
    count = len(ends) + (0 if _SENTENCE_END.search(text[-1:] + " ") else 1)
    return _score(count <= n)


def title(completion: str) -> float:
    """A title in double angle brackets, like <<a title>>."""
    return _score(re.search(r"<<[^\n<>]+>>", completion) is not None)


REWARDS: dict[str, Reward] = {
    fn.__name__: fn
    for fn in (
        lowercase,
        uppercase,
        max_words,
        min_words,
        include_keywords,
        exclude_words,
        keyword_frequency,
        json_answer,
        ends_with,
        starts_with,
        no_commas,
        bullet_points,
        quoted,
        max_sentences,
        title,
    )
}
"""Every checker by name: a reward `(completion, **kwargs) -> float` in {0.0, 1.0}."""


@dataclass(frozen=True)
class Check:
    """One instruction of a prompt: the checker's name and its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, completion: str) -> float:
        return REWARDS[self.name](completion, **self.kwargs)


@dataclass(frozen=True)
class InstructionPrompt:
    """A prompt and the checks its instructions imply."""

    prompt: str
    checks: tuple[Check, ...]


def loose_variants(completion: str) -> list[str]:
    """The answer, without its first line, last line or both, each also without markdown asterisks."""
    lines = completion.split("\n")
    variants = [completion, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip()]
    variants.append("\n".join(lines[1:-1]).strip())
    return variants + [variant.replace("*", "") for variant in variants]


def check_answer(item: InstructionPrompt, completion: str) -> dict[str, list[bool]]:
    """`{"strict": [...], "loose": [...]}`: whether each of the prompt's instructions is followed."""
    variants = [variant for variant in loose_variants(completion) if variant.strip()] or [completion]
    return {
        "strict": [bool(check(completion)) for check in item.checks],
        "loose": [any(check(variant) for variant in variants) for check in item.checks],
    }


def instruction_reward(completion: str, checks: list[Check] | tuple[Check, ...]) -> float:
    """Share of `checks` the completion passes (strict): a graded reward for GRPO."""
    return sum(check(completion) for check in checks) / len(checks) if checks else 0.0


def _p(prompt: str, *checks: tuple[str, dict]) -> InstructionPrompt:
    return InstructionPrompt(prompt, tuple(Check(name, dict(kwargs)) for name, kwargs in checks))


INSTRUCTION_PROMPTS: tuple[InstructionPrompt, ...] = (
    _p("Describe the ocean. Use lower case letters only.", ("lowercase", {})),
    _p("What is your favourite book? Answer in at most 10 words.", ("max_words", {"n": 10})),
    _p("Tell me about computers. Include the word memory.", ("include_keywords", {"keywords": ["memory"]})),
    _p(
        'Give your name and age as JSON, like {"name": ..., "age": ...}. Reply with the JSON only.',
        ("json_answer", {}),
    ),
    _p(
        "Say something about the weather. End your answer with the phrase: Have a nice day.",
        ("ends_with", {"phrase": "Have a nice day."}),
    ),
    _p("Explain what a robot is without using any commas.", ("no_commas", {})),
    _p("WHAT IS THE SUN? ANSWER IN CAPITAL LETTERS ONLY.", ("uppercase", {})),
    _p("List three fruits as markdown bullet points (* item).", ("bullet_points", {"n": 3})),
    _p("Describe a cat in one sentence.", ("max_sentences", {"n": 1})),
    _p("Wrap your whole answer in double quotes: what is love?", ("quoted", {})),
    _p("Write a short poem about rain with a title in double angle brackets, like <<title>>.", ("title", {})),
    _p("Start your answer with the word Yes. Do you like music?", ("starts_with", {"phrase": "Yes"})),
    _p("Tell me about history without using the word war.", ("exclude_words", {"words": ["war"]})),
    _p(
        "Talk about dogs and use the word dog at least 3 times.",
        ("keyword_frequency", {"keyword": "dog", "n": 3}),
    ),
    _p("Write at least 30 words about science.", ("min_words", {"n": 30})),
    _p(
        "Hello! How are you? Answer in lower case and in at most 12 words.",
        ("lowercase", {}),
        ("max_words", {"n": 12}),
    ),
    _p(
        "What is money? Mention both bank and trade, and use no commas.",
        ("include_keywords", {"keywords": ["bank", "trade"]}),
        ("no_commas", {}),
    ),
    _p(
        "Who are you? Answer in two sentences at most and end with the word friend.",
        ("max_sentences", {"n": 2}),
        ("ends_with", {"phrase": "friend"}),
    ),
    _p(
        'Return a JSON object with a key "answer" saying what 2 + 2 is. Only JSON, please.',
        ("json_answer", {}),
    ),
    _p("Give two tips for sleeping well as markdown bullets (- tip).", ("bullet_points", {"n": 2})),
    _p(
        "What do you eat for breakfast? Use capital letters only and at most 8 words.",
        ("uppercase", {}),
        ("max_words", {"n": 8}),
    ),
    _p("Describe the moon without the words night or sky.", ("exclude_words", {"words": ["night", "sky"]})),
    _p(
        "Tell me a joke and finish with: That is all.",
        ("ends_with", {"phrase": "That is all."}),
    ),
    _p(
        "Name a famous scientist. Include the word physics, in lower case only.",
        ("include_keywords", {"keywords": ["physics"]}),
        ("lowercase", {}),
    ),
    _p("Can you sing? Answer in at most 5 words.", ("max_words", {"n": 5})),
    _p(
        "Write about the internet in at least 20 words without any commas.",
        ("min_words", {"n": 20}),
        ("no_commas", {}),
    ),
    _p(
        "Begin with the words I think and tell me if robots can feel.",
        ("starts_with", {"phrase": "I think"}),
    ),
    _p(
        "Quote a proverb. Put the whole answer inside double quotes and use the word time.",
        ("quoted", {}),
        ("include_keywords", {"keywords": ["time"]}),
    ),
    _p(
        "Give a title in double angle brackets (<<title>>) and then one sentence about food.",
        ("title", {}),
    ),
    _p(
        "Use the word music at least twice and answer in lower case: what do you like?",
        ("keyword_frequency", {"keyword": "music", "n": 2}),
        ("lowercase", {}),
    ),
)
"""The embedded instruction-following prompts (30; 40 instructions)."""


# -- rewards for online RL (GRPO) --------------------------------------------------------------------------------


def length_in_range(completion: str, low: int, high: int) -> float:
    """Between `low` and `high` words, both included."""
    return _score(low <= len(_words(completion)) <= high)


def ends_properly(completion: str, finished: bool) -> float:
    """Generation stopped on the end token (eos), not at the length limit, after some text. `finished` says
    whether the last generated token was eos (GRPO's reward resolver reads it from the completion's ids)."""
    return _score(bool(finished) and bool(completion.strip()))


def no_repeated_ngrams(completion: str, n: int = 3) -> float:
    """No sequence of `n` tokens (words and punctuation marks, any case) appears twice, and the answer has a word.
    Punctuation counts, so `I am.......` repeats `. . .` (words alone would let a policy pad with dots)."""
    tokens = [token.lower() for token in re.findall(r"\w+|[^\w\s]", completion)]
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return _score(bool(_words(completion)) and len(grams) == len(set(grams)))


def matches_regex(completion: str, pattern: str) -> float:
    """The regular expression `pattern` matches somewhere in the answer (`re.search`, `.` also matches a newline);
    anchor it with `^...$` to match the whole answer."""
    return _score(re.search(pattern, completion, re.DOTALL) is not None)


CHECKABLE_REWARDS: dict[str, Reward] = {
    **REWARDS,
    **{fn.__name__: fn for fn in (length_in_range, ends_properly, no_repeated_ngrams, matches_regex)},
}
"""Every checker a GRPO recipe can name as a reward: the instruction checkers of `REWARDS` and the four above
(answer form rather than instructions: no embedded instruction prompt uses them)."""
