"""A GRPO recipe's `reward_funcs`: each entry resolved to a reward function GRPO calls on every completion.

```yaml
reward_funcs:
  - outputs/tiny-rm                        # a reward head trained here (`jetmoe-ft cls`, num_labels: 1), full or adapter
  - no_repeated_ngrams                     # a built-in checkable reward (`jetmoe_ft.evaluation.rewards.CHECKABLE_REWARDS`)
  - length_in_range: {low: 3, high: 30}    # ... with its arguments
  - my_rewards:brevity                     # a function of yours, `module:function` (arguments: the same mapping form)
reward_weights: [1.0, 0.5, 0.5, 1.0]      # optional; GRPO sums the weighted rewards
```

Every entry becomes a callable with TRL's reward signature `(prompts, completions, completion_ids, **kwargs) ->
list[float]`: a reward head scores prompt + completion with its own tokenizer and chat template, a built-in scores
the completion's text (and `finished`, from its token ids, for `ends_properly`), a user function is called as is
(it must accept those keywords and `**kwargs`: GRPO also passes `trainer_state`, `log_extra`, `log_metric` and
the data's other columns). `parse_reward_funcs` checks every entry before any model loads (one-line
`RecipeError`s naming the entry); `build_reward_funcs` loads the heads.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithPadding

from ..config import RecipeError
from .eval_cls import head_config, load_head, reward_head_config
from .rewards import CHECKABLE_REWARDS

TRL_REWARD_KWARGS = {
    "prompts": [],
    "completions": [],
    "completion_ids": [],
    "trainer_state": None,
    "log_extra": None,
    "log_metric": None,
}
"""What GRPOTrainer (trl 1.16) passes to every reward function, besides the data's other columns."""


@dataclass
class RewardSpec:
    """One checked `reward_funcs` entry: a built-in, a reward head directory, or a user function."""

    kind: str  # "builtin" | "head" | "function"
    name: str
    target: Any  # the built-in or user function; the head's directory
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_reward_funcs(entries: Any, missing_head_fallback: str | None = None) -> list[RewardSpec]:
    """Check every entry of `reward_funcs` (no model is loaded). A reward-head directory that does not exist is
    replaced by the built-in `missing_head_fallback` when one is given (and the replacement is printed)."""
    if isinstance(entries, str | dict):
        entries = [entries]
    if not entries or not isinstance(entries, list):
        raise RecipeError(
            "reward_funcs: give a list of rewards: built-in names (e.g. no_repeated_ngrams), reward-model "
            "directories, or module:function."
        )
    specs = []
    for index, entry in enumerate(entries):
        where = f"reward_funcs[{index}]"
        name, kwargs = _name_and_kwargs(entry, where)
        if (
            name not in CHECKABLE_REWARDS
            and ":" not in name
            and not Path(name).expanduser().exists()
            and _is_path(name)
        ):
            if missing_head_fallback:
                print(
                    f"{where}: no reward model at {name}; using the built-in `{missing_head_fallback}` instead."
                )
                name, kwargs = _name_and_kwargs(missing_head_fallback, "reward_model_fallback")
            else:
                raise RecipeError(
                    f"{where}: no reward-model directory {name} (train one with `jetmoe-ft cls`)."
                )
        specs.append(_spec(name, kwargs, where))
    names = [spec.name for spec in specs]
    for spec in specs:  # two entries of one reward (other arguments) get told apart in the logs
        if names.count(spec.name) > 1:
            spec.name = f"{spec.name}({', '.join(f'{k}={v}' for k, v in spec.kwargs.items())})"
    return specs


def _name_and_kwargs(entry: Any, where: str) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry.strip(), {}
    if isinstance(entry, dict) and len(entry) == 1:
        ((name, kwargs),) = entry.items()
        kwargs = {} if kwargs is None else kwargs
        if isinstance(name, str) and isinstance(kwargs, dict):
            return name.strip(), kwargs
    raise RecipeError(
        f"{where}: expected a name or a one-key mapping name -> arguments (e.g. `length_in_range: {{low: 3, "
        f"high: 30}}`), got {entry!r:.80}."
    )


def _is_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "/" in name


def _spec(name: str, kwargs: dict[str, Any], where: str) -> RewardSpec:
    if name in CHECKABLE_REWARDS:
        _check_arguments(
            CHECKABLE_REWARDS[name], {"completion": "", "finished": True, **kwargs}, name, where, _usage(name)
        )
        return RewardSpec("builtin", name, CHECKABLE_REWARDS[name], kwargs)
    path = Path(name).expanduser()
    if path.is_dir():
        reward_head_config(path, where)
        if kwargs:
            raise RecipeError(f"{where}: a reward model takes no arguments, got {', '.join(kwargs)}.")
        return RewardSpec("head", path.name, str(path))
    if ":" in name:
        function = _import_function(name, where)
        _check_arguments(
            function, {**TRL_REWARD_KWARGS, **kwargs}, name, where, "(prompts, completions, **kwargs)"
        )
        return RewardSpec("function", name.split(":", 1)[1], function, kwargs)
    close = difflib.get_close_matches(name, list(CHECKABLE_REWARDS), n=1, cutoff=0.6)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    raise RecipeError(
        f"{where}: `{name}` is not a built-in reward{hint}, a reward-model directory or module:function; "
        f"built-ins: {', '.join(sorted(CHECKABLE_REWARDS))}."
    )


def _usage(name: str) -> str:
    parameters = [
        p
        for p in inspect.signature(CHECKABLE_REWARDS[name]).parameters
        if p not in ("completion", "finished")
    ]
    return f"{{{', '.join(f'{p}: ...' for p in parameters)}}}" if parameters else "no arguments"


def _check_arguments(
    function: Callable, arguments: dict[str, Any], name: str, where: str, usage: str
) -> None:
    signature = inspect.signature(function)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if "finished" in arguments and "finished" not in signature.parameters and not accepts_any:
        arguments = {key: value for key, value in arguments.items() if key != "finished"}
    try:
        signature.bind(**arguments)
    except TypeError as error:
        raise RecipeError(
            f"{where}: {name} cannot be called as a reward ({error}); it takes {usage}."
        ) from None


def _import_function(name: str, where: str) -> Callable:
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RecipeError(f"{where}: cannot import {module_name} for {name} ({error}).") from None
    function = getattr(module, attribute, None)
    if function is None:
        raise RecipeError(f"{where}: module {module_name} has no `{attribute}`.")
    if not callable(function):
        raise RecipeError(f"{where}: {name} is a {type(function).__name__}, not a function.")
    return function


# -- the callables GRPO gets ----------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or (conversational data) the content of its last message."""
    if isinstance(completion, list):
        return str(completion[-1]["content"]) if completion else ""
    return str(completion)


class CheckableReward:
    """A built-in checkable reward over a batch of completions."""

    def __init__(self, spec: RewardSpec, eos_token_ids: list[int]):
        self.__name__ = spec.name
        self.function = functools.partial(spec.target, **spec.kwargs)
        self.eos_token_ids = set(eos_token_ids)
        self.wants_finished = "finished" in inspect.signature(spec.target).parameters

    def __call__(self, completions, completion_ids=None, **kwargs) -> list[float]:
        if not self.wants_finished:
            return [self.function(completion_text(c)) for c in completions]
        finished = [bool(ids) and ids[-1] in self.eos_token_ids for ids in completion_ids]
        return [
            self.function(completion_text(c), finished=f) for c, f in zip(completions, finished, strict=True)
        ]


class RewardHead:
    """A reward head (`JetMoeForSequenceClassification`, one label) scoring prompt + completion, as a reward.

    The text is what the head was trained on (TRL's `RewardTrainer`, `evaluate.pair_token_ids`): the head's own
    chat template over prompt + completion for conversations, else prompt + completion + eos."""

    def __init__(self, spec: RewardSpec, device: torch.device | str = "cpu", batch_size: int = 32):
        self.__name__ = spec.name
        self.model, self.tokenizer = load_head(spec.target, head_config(spec.target))
        self.model.to(device).requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.collator = DataCollatorWithPadding(self.tokenizer)

    def token_ids(self, prompt: Any, completion: Any) -> list[int]:
        if isinstance(prompt, list):
            messages = [*prompt, {"role": "assistant", "content": completion_text(completion)}]
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = self.tokenizer(prompt + completion_text(completion) + self.tokenizer.eos_token)["input_ids"]
        return ids[: self.model.config.max_position_embeddings]

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        encoded = [self.token_ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores = []
        for start in range(0, len(encoded), self.batch_size):
            batch = self.collator([{"input_ids": ids} for ids in encoded[start : start + self.batch_size]])
            batch = batch.to(self.device)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


def build_reward_funcs(
    specs: list[RewardSpec], eos_token_ids: list[int], device: torch.device | str = "cpu"
) -> list[Callable]:
    """The reward functions for GRPOTrainer's `reward_funcs`, in the recipe's order (reward heads loaded here)."""
    functions = []
    for spec in specs:
        if spec.kind == "builtin":
            functions.append(CheckableReward(spec, eos_token_ids))
        elif spec.kind == "head":
            functions.append(RewardHead(spec, device))
        else:
            function = functools.partial(spec.target, **spec.kwargs) if spec.kwargs else spec.target
            functions.append(function)
    return functions
