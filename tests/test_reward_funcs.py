"""GRPO's `reward_funcs`: the new checkable rewards, and resolving entries (built-ins, heads, module:function)."""

import pytest
import torch

from jetmoe_ft import JetMoeConfig, JetMoeForSequenceClassification
from jetmoe_ft.assets import load_tokenizer
from jetmoe_ft.config import RecipeError
from jetmoe_ft.evaluation.eval_cls import pair_token_ids
from jetmoe_ft.evaluation.reward_funcs import build_reward_funcs, parse_reward_funcs
from jetmoe_ft.evaluation.rewards import CHECKABLE_REWARDS

from .conftest import tiny_kwargs

PROMPT = [{"role": "user", "content": "What is a robot?"}]


def brevity(prompts, completions, **kwargs):
    """A user reward: shorter is better."""
    return [-float(len(str(c))) for c in completions]


def scaled(completions, factor=1.0, **kwargs):
    return [factor * len(c) for c in completions]


def no_kwargs(completions):
    return [0.0 for _ in completions]


NOT_A_FUNCTION = 3


@pytest.mark.parametrize(
    "name, kwargs, completion, expected",
    [
        ("length_in_range", {"low": 2, "high": 3}, "one two three", 1.0),
        ("length_in_range", {"low": 2, "high": 3}, "one", 0.0),
        ("length_in_range", {"low": 2, "high": 3}, "one two three four", 0.0),
        ("ends_properly", {"finished": True}, "A robot is a machine.", 1.0),
        ("ends_properly", {"finished": False}, "A robot is a", 0.0),
        ("ends_properly", {"finished": True}, "  ", 0.0),
        ("no_repeated_ngrams", {"n": 2}, "a robot is a machine", 1.0),
        ("no_repeated_ngrams", {"n": 2}, "a robot is A ROBOT", 0.0),
        ("no_repeated_ngrams", {}, "", 0.0),
        ("no_repeated_ngrams", {}, "I am.......", 0.0),  # padding with punctuation is repetition too
        ("no_repeated_ngrams", {}, "...", 0.0),
        ("no_repeated_ngrams", {}, "Yes. No. Yes, maybe.", 1.0),
        ("matches_regex", {"pattern": r"\d+ apples"}, "I have 12 apples.", 1.0),
        ("matches_regex", {"pattern": r"^\d+$"}, "12 apples", 0.0),
        ("matches_regex", {"pattern": r"^a.*z$"}, "a\nz", 1.0),
    ],
)
def test_new_checkable_rewards_on_hand_cases(name, kwargs, completion, expected):
    assert CHECKABLE_REWARDS[name](completion, **kwargs) == expected


def test_built_ins_with_arguments_become_batch_rewards():
    specs = parse_reward_funcs(
        ["no_repeated_ngrams", {"length_in_range": {"low": 1, "high": 2}}, "ends_properly"]
    )
    assert [(s.kind, s.name) for s in specs] == [
        ("builtin", "no_repeated_ngrams"),
        ("builtin", "length_in_range"),
        ("builtin", "ends_properly"),
    ]
    repeated, length, ends = build_reward_funcs(specs, eos_token_ids=[2])
    completions = [
        [{"role": "assistant", "content": "ok then"}],
        [{"role": "assistant", "content": "a b c a b c"}],
    ]
    assert repeated(completions=completions, completion_ids=[[5, 2], [5, 6]]) == [1.0, 0.0]
    assert length(completions=completions, completion_ids=[[5, 2], [5, 6]]) == [1.0, 0.0]
    # finished = the last generated token is eos
    assert ends(completions=completions, completion_ids=[[5, 2], [5, 6]]) == [1.0, 0.0]
    assert [length.__name__, ends.__name__] == ["length_in_range", "ends_properly"]


def test_two_entries_of_one_reward_get_distinct_names():
    specs = parse_reward_funcs([{"max_words": {"n": 3}}, {"max_words": {"n": 9}}])
    assert [s.name for s in specs] == ["max_words(n=3)", "max_words(n=9)"]


def test_a_dotted_name_is_imported_with_its_arguments():
    first, second = build_reward_funcs(
        parse_reward_funcs(
            ["tests.test_reward_funcs:brevity", {"tests.test_reward_funcs:scaled": {"factor": 2}}]
        ),
        eos_token_ids=[2],
    )
    assert first is brevity
    assert second(prompts=["x"], completions=["abc"], completion_ids=[[1]], trainer_state=None) == [6.0]


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            "max_wrds",
            r"reward_funcs\[0\]: `max_wrds` is not a built-in reward \(did you mean `max_words`\?\)",
        ),
        ("max_words", r"reward_funcs\[0\]: max_words cannot be called as a reward .*it takes \{n: \.\.\.\}"),
        ({"max_words": {"m": 3}}, r"max_words cannot be called as a reward"),
        ({"max_words": 3}, r"expected a name or a one-key mapping"),
        ("no_such_module_xyz:fn", r"cannot import no_such_module_xyz"),
        ("tests.test_reward_funcs:missing", r"module tests.test_reward_funcs has no `missing`"),
        ("tests.test_reward_funcs:NOT_A_FUNCTION", r"is a int, not a function"),
        (
            "tests.test_reward_funcs:no_kwargs",
            r"no_kwargs cannot be called as a reward .*\(prompts, completions",
        ),
        ("./no/such/rm", r"no reward-model directory ./no/such/rm"),
    ],
)
def test_a_wrong_entry_is_one_line_naming_it(entry, message):
    with pytest.raises(RecipeError, match=message) as error:
        parse_reward_funcs([entry])
    assert "\n" not in str(error.value)


def test_nothing_to_reward_is_refused():
    for entries in (None, [], 3):
        with pytest.raises(RecipeError, match="reward_funcs: give a list of rewards"):
            parse_reward_funcs(entries)


def test_a_missing_reward_model_falls_back_to_a_built_in_and_says_so(capsys):
    (spec,) = parse_reward_funcs(["outputs/no-such-rm"], missing_head_fallback="no_repeated_ngrams")
    assert (spec.kind, spec.name) == ("builtin", "no_repeated_ngrams")
    assert (
        "no reward model at outputs/no-such-rm; using the built-in `no_repeated_ngrams`"
        in capsys.readouterr().out
    )


def _save_head(path, num_labels):
    torch.manual_seed(0)
    model = JetMoeForSequenceClassification(
        JetMoeConfig(**tiny_kwargs(vocab_size=32000), num_labels=num_labels, pad_token_id=0)
    )
    model.save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return model.eval()


def test_a_reward_head_scores_prompt_and_completion_with_its_own_chat_template(tmp_path):
    model = _save_head(tmp_path / "rm", num_labels=1)
    (spec,) = parse_reward_funcs([str(tmp_path / "rm")])
    assert (spec.kind, spec.name) == ("head", "rm")
    (head,) = build_reward_funcs([spec], eos_token_ids=[2])
    answers = ["A machine that works by itself.", "No idea, sorry, ask someone else please."]
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    scores = head(prompts=[PROMPT, PROMPT], completions=completions)
    tokenizer = load_tokenizer()
    for answer, completion, score in zip(answers, completions, scores, strict=True):
        # the very token ids TRL's RewardTrainer trained the head on
        ids, _ = pair_token_ids({"prompt": PROMPT, "chosen": completion, "rejected": completion}, tokenizer)
        assert head.token_ids(PROMPT, answer) == ids
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-4)
    assert scores[0] != scores[1]


def test_a_classifier_or_language_model_is_not_a_reward_model(tmp_path):
    _save_head(tmp_path / "cls", num_labels=3)
    with pytest.raises(
        RecipeError, match=r"reward_funcs\[0\]: .*cls is a classifier with 3 labels, not a reward"
    ):
        parse_reward_funcs([str(tmp_path / "cls")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"reward_funcs\[0\]: .*holds neither a model"):
        parse_reward_funcs([str(tmp_path / "empty")])
