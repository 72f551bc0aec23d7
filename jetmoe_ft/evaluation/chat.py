"""Talk to a trained JetMoE: `jetmoe-ft chat --model DIR [--prompt TEXT]`."""

import argparse
import sys
from contextlib import nullcontext

import torch
from transformers import AutoTokenizer

from ..config import RecipeError
from ..loading import load_trained_model
from .generation import CompiledDecoding


def load_chat_model(model_dir: str):
    """Model and tokenizer saved by a training run (full weights or a LoRA adapter), ready to generate."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = load_trained_model(model_dir, merge=True).eval()
    except OSError as error:
        raise RecipeError(
            f"--model: cannot load a model from {model_dir} ({str(error).splitlines()[0]})."
        ) from None
    if not tokenizer.chat_template:
        raise RecipeError(f"--model: the tokenizer in {model_dir} has no chat template.")
    return model, tokenizer


@torch.no_grad()
def reply(
    model,
    tokenizer,
    messages: list[dict],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    repetition_penalty=1.0,
    decoding: CompiledDecoding | None = None,
) -> str:
    """The assistant's answer to `messages`, greedy unless `temperature` > 0; with `decoding`, its decode steps
    run compiled over a static cache."""
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    width = inputs["input_ids"].shape[1]
    fast = decoding.generate_kwargs(width, max_new_tokens) if decoding is not None else {}
    with decoding.active() if decoding is not None else nullcontext():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            repetition_penalty=repetition_penalty,
            **sampling,
            **fast,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jetmoe-ft chat", description=__doc__)
    parser.add_argument("--model", required=True, help="A model directory written by a training run.")
    parser.add_argument(
        "--prompt", help="One message to answer; without it, chat until an empty line or EOF."
    )
    parser.add_argument("--system", help="An optional system message.")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily.")
    parser.add_argument("--repetition_penalty", type=float, default=1.2, help="1.0 turns it off.")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Decode with a static cache and a compiled forward (the first answer waits for compilation).",
    )
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_chat_model(args.model)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    decoding = CompiledDecoding(model) if args.compile else None
    history = [{"role": "system", "content": args.system}] if args.system else []
    prompts = [args.prompt] if args.prompt is not None else _read_prompts()
    for prompt in prompts:
        history.append({"role": "user", "content": prompt})
        answer = reply(
            model,
            tokenizer,
            history,
            args.max_new_tokens,
            args.temperature,
            args.repetition_penalty,
            decoding,
        )
        history.append({"role": "assistant", "content": answer})
        print(answer if args.prompt is not None else f"assistant> {answer}", flush=True)
    return 0


def _read_prompts():
    while True:
        try:
            prompt = input("you> ").strip()
        except EOFError:
            return
        if not prompt:
            return
        yield prompt


if __name__ == "__main__":
    sys.exit(main())
