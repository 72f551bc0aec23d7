"""Answers from a JetMoE model and what can be measured on them: batched generation (left padding, the model's
own KV cache, or compiled decode steps over a static cache: `CompiledDecoding`), the loss of reference answers,
and answer statistics (length, distinct-n, repetition)."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..modeling import JetMoeForCausalLM

Prompt = list[dict[str, str]] | str
"""A conversation to answer (messages without the answer) or plain text to continue."""


@dataclass
class Answer:
    """One generated answer: its text, its token ids (up to and including eos) and whether it ended with eos."""

    text: str
    token_ids: list[int]
    finished: bool


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids the model continues: the chat template with the assistant's turn opened, or the plain text."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` / `attention_mask` with the padding on the left, so every row ends where generation starts."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def generate_answers(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    desc: str = "Generating",
    decoding: CompiledDecoding | None = None,
) -> list[list[Answer]]:
    """`num_samples` answers per prompt (token ids), greedy unless `do_sample`; batches of similar lengths.

    Sampling is seeded per batch from `seed`, so two models see the same random stream. With `decoding`
    (`CompiledDecoding` of this model), the decode steps run its compiled forward over a static cache.
    """
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    order = np.argsort([len(ids) for ids in prompts], kind="stable")[::-1]
    answers: list[list[Answer]] = [[] for _ in prompts]
    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            rows = order[start : start + batch_size]
            batch = left_pad([prompts[i] for i in rows], pad_id)
            torch.manual_seed(seed + start)
            fast = (
                {}
                if decoding is None
                else decoding.generate_kwargs(batch["input_ids"].shape[1], max_new_tokens)
            )
            with decoding.active() if decoding is not None else nullcontext():
                output = model.generate(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=num_samples,
                    pad_token_id=pad_id,
                    eos_token_id=eos_id,
                    **sampling,
                    **fast,
                )
            new = output[:, batch["input_ids"].shape[1] :].cpu().tolist()
            for j, ids in enumerate(new):
                answers[rows[j // num_samples]].append(_answer(tokenizer, ids, eos_id))
    finally:
        model.train(was_training)
    return answers


def _answer(tokenizer: PreTrainedTokenizerBase, ids: list[int], eos_id: int) -> Answer:
    finished = eos_id in ids
    ids = ids[: ids.index(eos_id) + 1] if finished else ids
    return Answer(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, finished)


def reference_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, reference: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + reference answer and a 0/1 mask of the answer's tokens (its eos included), cut to
    `max_length`. Conversations use the chat template's assistant mask, restricted to the last turn."""
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    if isinstance(prompt, str):
        answer = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, mask = prompt_ids + answer, [0] * len(prompt_ids) + [1] * len(answer)
    else:
        encoded = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": reference}],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = encoded["input_ids"]
        mask = [m if i >= len(prompt_ids) else 0 for i, m in enumerate(encoded["assistant_masks"])]
    return ids[:max_length], mask[:max_length]


@torch.no_grad()
def answer_nll(
    model, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16
) -> np.ndarray:
    """[N, 2]: summed next-token negative log-likelihood (nats) of each row's masked tokens, and their count."""
    device = next(model.parameters()).device
    out = np.zeros((len(rows), 2))
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="Reference loss", unit="batch"):
            chunk = rows[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            target = torch.zeros_like(input_ids)
            for r, (ids, mask) in enumerate(chunk):
                input_ids[r, : len(ids)], attention[r, : len(ids)] = torch.tensor(ids), 1
                target[r, : len(mask)] = torch.tensor(mask)
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False
            ).logits
            log_probs = F.log_softmax(logits[:, :-1].float(), -1)
            nll = -log_probs.gather(-1, input_ids[:, 1:, None].to(device))[..., 0].cpu()
            weight = target[:, 1:].double()
            out[start : start + len(chunk), 0] = (nll.double() * weight).sum(-1).numpy()
            out[start : start + len(chunk), 1] = weight.sum(-1).numpy()
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# answer statistics: each takes a list of per-prompt answer lists, so a bootstrap can resample prompts


def _words(text: str) -> list[str]:
    return text.lower().split()


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(groups: list[list[Answer]], n: int) -> float:
    """Distinct word n-grams over all n-grams of all answers (Li et al. 2016); nan without any n-gram."""
    grams = [gram for answers in groups for answer in answers for gram in _ngrams(_words(answer.text), n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repeated_ngrams(answer: Answer, n: int = 3) -> float:
    """Share of an answer's word n-grams that repeat an earlier one of the same answer (0 when none)."""
    grams = _ngrams(_words(answer.text), n)
    return (len(grams) - len(Counter(grams))) / len(grams) if grams else 0.0


def _mean(groups: list[list[Answer]], value) -> float:
    values = [value(answer) for answers in groups for answer in answers]
    return float(np.mean(values)) if values else float("nan")


ANSWER_STATS: dict[str, Any] = {
    "answer_tokens": lambda groups: _mean(groups, lambda a: len(a.token_ids)),
    "answer_words": lambda groups: _mean(groups, lambda a: len(_words(a.text))),
    "distinct_1": lambda groups: distinct_n(groups, 1),
    "distinct_2": lambda groups: distinct_n(groups, 2),
    "repeated_3grams": lambda groups: _mean(groups, repeated_ngrams),
    "hit_max_new_tokens": lambda groups: _mean(groups, lambda a: float(not a.finished)),
    "empty": lambda groups: _mean(groups, lambda a: float(not a.text.strip())),
}
"""Answer statistics by name: a function of per-prompt answer lists."""


# ---------------------------------------------------------------------------------------------
# compiled decoding


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The `JetMoeForCausalLM` inside `model` (PEFT or distributed wrappers around it), or `model` itself."""
    for module in model.modules():
        if isinstance(module, JetMoeForCausalLM):
            return module
    return model


class CompiledDecoding:
    """`generate` with transformers' static cache and its decode steps through a `torch.compile`d forward.

    The prefill runs eagerly (its width changes with every batch of prompts, each width a new graph); inside
    `active()` every single-token forward of the causal LM without gradients runs one fullgraph-compiled forward.
    The forward, not the module's `__call__`, is compiled, so forward hooks on the causal LM run eagerly around it
    and may keep Python state (the rollout routing record does). The static cache's length is rounded up to
    `cache_multiple` tokens, so batches of similar prompts reuse one graph. If compiling fails, one line says why
    and generation stays eager from then on.
    """

    def __init__(self, model: nn.Module, backend: str = "inductor", cache_multiple: int = 64):
        self.causal_lm = causal_lm_of(model)
        self.backend = backend
        self.cache_multiple = cache_multiple
        self.failed: str | None = None
        """Why compiling failed (then every forward is eager), or None."""
        self._compiled: tuple[Any, Any] | None = None  # (eager forward, its compiled graph)

    def generate_kwargs(self, prompt_width: int, max_new_tokens: int) -> dict[str, Any]:
        """`generate` keywords (or `GenerationConfig` fields) for prompts `prompt_width` tokens wide: the static
        cache, or the default dynamic one once compiling has failed."""
        if self.failed is not None:
            return {"cache_implementation": None}
        length = -(-(prompt_width + max_new_tokens) // self.cache_multiple) * self.cache_multiple
        return {"cache_implementation": "static", "max_cache_len": length}

    @contextmanager
    def active(self):
        """While inside, the causal LM's decode steps run the compiled forward."""
        causal_lm, eager = self.causal_lm, self.causal_lm.forward
        if self.failed is not None:
            yield
            return
        if self._compiled is None or self._compiled[0] is not eager:
            self._compiled = (
                eager,
                torch.compile(eager, fullgraph=True, dynamic=False, backend=self.backend),
            )
        compiled, checked = self._compiled[1], [False]

        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            decode_step = ids is not None and ids.shape[1] == 1 and not torch.is_grad_enabled()
            if self.failed is not None or not decode_step or kwargs.get("fused_lm_head"):
                return eager(*args, **kwargs)
            if checked[0]:
                return compiled(*args, **kwargs)
            try:  # the first decode step of each `generate` may compile (a new batch size or cache length)
                output = compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - whatever stops compilation, decoding stays possible
                self.failed = _first_cause(error)
                print(f"Compiled decoding is not possible here ({self.failed}); decoding eagerly.")
                return eager(*args, **kwargs)
            checked[0] = True
            return output

        causal_lm.forward = forward
        try:
            yield
        finally:
            causal_lm.forward = eager


def _first_cause(error: BaseException) -> str:
    """`Type: first line` of the innermost cause (dynamo wraps a backend's error in its own)."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
