"""The probe inputs every check runs on, and the run's own outputs on them (`probe.safetensors`): logits, greedy
tokens, router logits and top-k, so anyone can check an export again later."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .sources import Source, quantization_settings, quantized_model

PROBE_MESSAGES = (
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "user", "content": "What is a computer?"}],
    [{"role": "user", "content": "Tell me a joke about robots."}],
)
PROBE_TEXTS = ("A warm, funny and clever film.", "Dull, long and badly acted.", "It was a movie.")
REWARD_ANSWERS = ("I am fine, thank you.", "A machine that computes.", "No.")
GREEDY_TOKENS = 16


def make_probes(tokenizer, source: Source) -> list[dict[str, Any]]:
    """Chat prompts for a language model, rated conversations for a reward head, texts for a classifier."""
    probes = []
    if source.head == "classifier":
        return [
            {"text": text, "input_ids": torch.tensor(tokenizer(text)["input_ids"])} for text in PROBE_TEXTS
        ]
    for messages, answer in zip(PROBE_MESSAGES, REWARD_ANSWERS, strict=True):
        if tokenizer.chat_template is None:
            text = messages[0]["content"] + (f" {answer}" if source.head == "reward" else "")
            probes.append({"text": text, "input_ids": torch.tensor(tokenizer(text)["input_ids"])})
            continue
        conversation = (
            [*messages, {"role": "assistant", "content": answer}] if source.head == "reward" else messages
        )
        generation_prompt = source.head == "lm"
        ids = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
        )["input_ids"]
        probes.append(
            {"messages": conversation, "generation_prompt": generation_prompt, "input_ids": torch.tensor(ids)}
        )
    return probes


def probe_logits(model, input_ids: torch.Tensor, source: Source) -> torch.Tensor:
    """fp32 logits of one probe row: `[tokens, vocab]` for a language model, `[1, labels]` for a head."""
    logits = model(input_ids=input_ids[None]).logits
    return (logits[0] if source.task == "causal_lm" else logits).float()


@torch.no_grad()
def write_probe(model, probes: list[dict], path: Path, source: Source) -> dict[str, list[torch.Tensor]]:
    """Write `probe.safetensors` from the run's own model (in the export's dtype); returns its logits and greedy
    tokens per probe."""
    tensors: dict[str, torch.Tensor] = {"count": torch.tensor(len(probes))}
    k = model.config.num_experts_per_tok
    reference: dict[str, list[torch.Tensor]] = {"logits": [], "greedy": []}
    for index, probe in enumerate(probes):
        input_ids = probe["input_ids"]
        logits = probe_logits(model, input_ids, source)
        tensors[f"{index}/input_ids"] = input_ids
        tensors[f"{index}/logits"] = logits.contiguous()
        reference["logits"].append(logits)
        routed = input_ids.clone()  # its own tensor: safetensors refuses two names for one memory
        if source.task == "causal_lm":
            generated = model.generate(
                input_ids[None],
                max_new_tokens=GREEDY_TOKENS,
                do_sample=False,
                pad_token_id=model.config.pad_token_id,
                eos_token_id=model.generation_config.eos_token_id,
            )[0, input_ids.numel() :]
            generated = until_eos(generated, model.generation_config.eos_token_id)
            tensors[f"{index}/greedy"] = generated
            reference["greedy"].append(generated)
            routed = torch.cat([routed, generated])
        routed_output = model(input_ids=routed[None], output_router_logits=True)
        router_logits = torch.stack([r.float() for r in routed_output.router_logits])
        tensors[f"{index}/routed_ids"] = routed
        if source.task == "causal_lm":
            tensors[f"{index}/routed_logits"] = routed_output.logits[0].float().contiguous()
        tensors[f"{index}/topk"] = router_logits.topk(k, dim=-1).indices
        tensors[f"{index}/router_logits"] = router_logits.contiguous()
    save_file(tensors, str(path))
    return reference


def until_eos(tokens: torch.Tensor, eos) -> torch.Tensor:
    """`tokens` up to and with the first end-of-sequence token."""
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for position, token in enumerate(tokens.tolist()):
        if token in eos:
            return tokens[: position + 1]
    return tokens


def mean_kl(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """Mean KL(first || second) over the positions of the probe rows, in float64."""
    values = []
    for p_logits, q_logits in zip(first, second, strict=True):
        log_p, log_q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
        values.append((log_p.exp() * (log_p - log_q)).sum(-1).mean().item())
    return max(sum(values) / len(values), 0.0)


@torch.no_grad()
def qlora_distance(source: Source, probes: list[dict], reference: dict) -> dict[str, Any]:
    """How far the export is from the 4-bit model the QLoRA adapter was trained with, on the probe prompts."""
    four_bit = quantized_model(source)
    logits = [probe_logits(four_bit, probe["input_ids"], source) for probe in probes]
    greedy_same = True
    if source.task == "causal_lm":
        for probe, expected in zip(probes, reference["greedy"], strict=True):
            generated = four_bit.generate(
                input_ids=probe["input_ids"][None],
                max_new_tokens=expected.numel(),
                do_sample=False,
                pad_token_id=four_bit.config.pad_token_id,
            )[0, probe["input_ids"].numel() :]
            greedy_same &= torch.equal(generated[: expected.numel()], expected)
    return {
        **quantization_settings(source),
        "max_abs_logit_difference": max(
            (a - b).abs().max().item() for a, b in zip(logits, reference["logits"], strict=True)
        ),
        "mean_kl": mean_kl(logits, reference["logits"]),
        "greedy_identical": bool(greedy_same),
        "compared_with": "the 4-bit model with the adapter (jetmoe-ft's dispatch), fp32 logits",
    }
