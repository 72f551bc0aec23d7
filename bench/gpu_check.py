"""The GPU checks of jetmoe-ft in one run, one JSON line per check (run through `bench/gpu_check.sh`).

    bash bench/gpu_check.sh                 # on a machine with a CUDA GPU: installs what it needs, <= 8 min
    python bench/gpu_check.py --dry-run     # the same checks on CPU with a tiny model (smoke test, ~20 s)

Checks, in this order; a check that fails or errors does not stop the others, and a check that cannot run
here (no flash-attn, no bitsandbytes, out of time) says `skipped` and why:

- `environment`: versions, the GPU, which optional packages are importable.
- `flash_vs_sdpa`: our model's logits with `attn_implementation="flash_attention_2"` and with `"sdpa"`, in
  bf16, on a right-padded batch; each against an fp32 reference with the same weights. flash-attn passes if
  its error is at most twice SDPA's (+1e-3): both are bf16, neither is the reference.
- `padding_free`: sequences packed into one row (`position_ids` restarting, and `cu_seq_lens` as TRL's
  padding-free collator passes them) get the logits each sequence gets alone: exact in fp32 (SDPA, error
  <= 1e-5 of the largest logit), within bf16 noise for SDPA and flash-attn; and the packed fp32 training
  loss and gradients equal those of the padded batch.
- `backend_parity`: `moe_backend: grouped_mm` against `loop` in bf16, forward logits and the gradients of
  every trainable parameter, with expert LoRA (`jetmoe_ft.adapters.lora`) on the MoA and MoE experts and kv_proj;
  both against an fp32 `loop` reference: grouped_mm passes if its error is at most twice the loop's (+1e-3).
- `qlora_step`: a recipe with `load_in_4bit: true` and expert LoRA loaded through `jetmoe_ft.loading` and
  `jetmoe_ft.adapters.adapt`, one AdamW step: finite loss, adapters moved, 4-bit weights untouched, peak memory.
- `train_throughput`: training tokens/s (median of timed steps after warm-up) and peak GPU memory of ours
  against transformers' `JetMoeForCausalLM` with the same weights, on a ~1B-parameter JetMoE (hidden 1024,
  12 layers, 8 experts top-2), bf16 weights and AdamW, batch 8 x 2048, SDPA attention for both.

Exit status: 0 when every check is `ok` or `skipped`, 1 when one failed or errored, 2 without CUDA (and no
`--dry-run`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing it

import torch  # noqa: E402

CHECKS = ("environment", "flash_vs_sdpa", "padding_free", "backend_parity", "qlora_step", "train_throughput")
NO_CUDA = "no CUDA device: this check needs an NVIDIA GPU (use --dry-run for the CPU smoke test)"
SEED = 0

# Shared dimensions: head_dim 128 (flash-attn's sweet spot), 8 experts top-2, the Llama vocabulary.
_BASE = dict(vocab_size=32000, kv_channels=128, num_local_experts=8, num_experts_per_tok=2)
GPU_PARITY_CONFIG = dict(
    _BASE, hidden_size=1024, num_hidden_layers=4, num_key_value_heads=8, intermediate_size=2816
)
GPU_BENCH_CONFIG = dict(
    _BASE, hidden_size=1024, num_hidden_layers=12, num_key_value_heads=8, intermediate_size=2816
)
TINY_CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_key_value_heads=2,
    kv_channels=16,
    intermediate_size=96,
    num_local_experts=4,
    num_experts_per_tok=2,
)


@dataclass(frozen=True)
class Settings:
    """Sizes and budgets of one run: the GPU run, or the CPU dry run with a tiny model."""

    device: str
    parity_config: dict
    parity_batch: tuple[int, int]
    packed_lengths: tuple[int, ...]
    bench_config: dict
    bench_batch: tuple[int, int]
    warmup_steps: int
    timed_steps: int
    lora_r: int
    dtype: torch.dtype = torch.bfloat16


def settings_for(dry_run: bool) -> Settings:
    """The GPU settings, or the tiny CPU ones for `--dry-run`."""
    if dry_run:
        return Settings(
            device="cpu",
            parity_config=TINY_CONFIG,
            parity_batch=(2, 24),
            packed_lengths=(5, 9, 13),
            bench_config=TINY_CONFIG,
            bench_batch=(2, 32),
            warmup_steps=1,
            timed_steps=2,
            lora_r=8,
        )
    return Settings(
        device="cuda",
        parity_config=GPU_PARITY_CONFIG,
        parity_batch=(4, 512),
        packed_lengths=(300, 517, 88, 1143),
        bench_config=GPU_BENCH_CONFIG,
        bench_batch=(8, 2048),
        warmup_steps=2,
        timed_steps=5,
        lora_r=16,
    )


def count_parameters(config: dict) -> int:
    """Parameters of a JetMoE config (tied embeddings), without building it."""
    hidden, experts = config["hidden_size"], config["num_local_experts"]
    attention = config["num_key_value_heads"] * config["kv_channels"]
    moa = 2 * experts * attention * hidden + 2 * attention * hidden + experts * hidden + hidden
    moe = 3 * experts * config["intermediate_size"] * hidden + experts * hidden + hidden
    layer = moa + moe + 2 * hidden
    return config["num_hidden_layers"] * layer + config["vocab_size"] * hidden + hidden


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|, in fp32."""
    value, reference = value.float(), reference.float()
    return ((value - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()


def within_noise(error: float, noise: float) -> bool:
    """A bf16 result is as good as another bf16 result whose error is `noise`."""
    return error <= 2 * noise + 1e-3


# ---------------------------------------------------------------------------------------------- models


def build_model(config: dict, settings: Settings, dtype=None, attn="sdpa", backend="auto"):
    """Our JetMoE from a seed, with non-zero MoA/MoE biases (zero-initialised) so they count."""
    from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM

    torch.manual_seed(SEED)
    with torch.device(settings.device):
        model = JetMoeForCausalLM(JetMoeConfig(**config, moe_backend=backend))
    randomize_biases(model)
    model.to(dtype or torch.float32)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return model.eval()


def randomize_biases(model: torch.nn.Module) -> None:
    generator = torch.Generator(device="cpu").manual_seed(SEED + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def token_batch(shape: tuple[int, int], vocab: int, device: str, seed: int = SEED) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=generator).to(device)


def has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Skip(Exception):
    """A check that cannot run here; its message says why."""


# ---------------------------------------------------------------------------------------------- checks


def check_environment(settings: Settings) -> dict:
    versions = {}
    for name in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "flash-attn",
        "bitsandbytes",
        "deepspeed",
    ):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    result = {"versions": versions, "device": settings.device, "cuda": torch.version.cuda}
    if settings.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["capability"] = list(torch.cuda.get_device_capability())
        result["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return result


def check_flash_vs_sdpa(settings: Settings) -> dict:
    if settings.device != "cuda":
        raise Skip(NO_CUDA)
    if not has_flash_attn():
        raise Skip("flash-attn is not installed (see bench/gpu_check.sh: PyPI has no wheel of it)")
    config = settings.parity_config
    batch, length = settings.parity_batch
    ids = token_batch((batch, length), config["vocab_size"], settings.device)
    mask = torch.ones_like(ids)
    for row, keep in enumerate((length, length - 37, length // 2, 17)[:batch]):
        mask[row, keep:] = 0  # right padding, as in training
    real = mask.bool()
    with torch.no_grad():
        reference = build_model(config, settings)(input_ids=ids, attention_mask=mask).logits[real]
        logits = {}
        for attn in ("sdpa", "flash_attention_2"):
            model = build_model(config, settings, dtype=settings.dtype, attn=attn)
            logits[attn] = model(input_ids=ids, attention_mask=mask).logits[real]
            del model
    sdpa_error = relative_error(logits["sdpa"], reference)
    flash_error = relative_error(logits["flash_attention_2"], reference)
    return {
        "ok": within_noise(flash_error, sdpa_error),
        "sdpa_bf16_vs_fp32": sdpa_error,
        "flash_bf16_vs_fp32": flash_error,
        "flash_vs_sdpa": relative_error(logits["flash_attention_2"], logits["sdpa"]),
    }


def packed_inputs(lengths: tuple[int, ...], vocab: int, device: str):
    """Sequences, their packed row, restarting position ids and cumulative lengths (TRL's padding-free batch)."""
    sequences = [token_batch((1, n), vocab, device, seed=SEED + i)[0] for i, n in enumerate(lengths)]
    packed = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    cu_seq_lens = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device
    )
    return sequences, packed, position_ids, cu_seq_lens


def check_padding_free(settings: Settings) -> dict:
    config = settings.parity_config
    sequences, packed, position_ids, cu_seq_lens = packed_inputs(
        settings.packed_lengths, config["vocab_size"], settings.device
    )
    packed_kwargs = dict(
        position_ids=position_ids,
        cu_seq_lens_q=cu_seq_lens,
        cu_seq_lens_k=cu_seq_lens,
        max_length_q=max(settings.packed_lengths),
        max_length_k=max(settings.packed_lengths),
    )
    result = {"lengths": list(settings.packed_lengths)}
    with torch.no_grad():
        fp32 = build_model(config, settings)
        alone = torch.cat([fp32(input_ids=s[None]).logits[0] for s in sequences])
        by_positions = fp32(input_ids=packed, position_ids=position_ids).logits[0]
        result["fp32_sdpa_max_diff"] = (by_positions - alone).abs().max().item()
        result["fp32_sdpa_error"] = relative_error(by_positions, alone)
        ok = result["fp32_sdpa_error"] <= 1e-5  # fp32 rounding of differently shaped matmuls, no more
        attns = ["sdpa"] + (["flash_attention_2"] if settings.device == "cuda" and has_flash_attn() else [])
        for attn in attns:
            model = build_model(config, settings, dtype=settings.dtype, attn=attn)
            separate = torch.cat([model(input_ids=s[None]).logits[0] for s in sequences])
            packed_logits = model(input_ids=packed, **packed_kwargs).logits[0]
            noise, error = relative_error(separate, alone), relative_error(packed_logits, alone)
            result[f"{attn}_bf16_alone_vs_fp32"], result[f"{attn}_bf16_packed_vs_fp32"] = noise, error
            ok = ok and within_noise(error, noise)
            del model
    if len(attns) == 1:
        result["flash_attention_2"] = "not run: " + (
            NO_CUDA if settings.device != "cuda" else "no flash-attn"
        )
    loss_diff, grad_error = packed_training_matches_padded(fp32, sequences, packed, position_ids)
    result["fp32_packed_vs_padded_loss_diff"], result["fp32_packed_vs_padded_grad_error"] = (
        loss_diff,
        grad_error,
    )
    result["ok"] = ok and loss_diff <= 1e-5 and grad_error <= 1e-4
    return result


def packed_training_matches_padded(model, sequences, packed, position_ids) -> tuple[float, float]:
    """Loss and gradients of the packed row (first token of each sequence unlabelled, as TRL does) against
    the right-padded batch of the same sequences."""
    model.train()
    labels = packed.clone()
    starts = (position_ids[0] == 0).nonzero()[:, 0]
    labels[0, starts] = -100
    packed_loss = model(input_ids=packed, position_ids=position_ids, labels=labels).loss
    packed_grads = torch.autograd.grad(packed_loss, list(model.parameters()), allow_unused=True)
    longest = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), longest), dtype=packed.dtype, device=packed.device)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)], mask[row, : len(sequence)] = sequence, 1
    padded_labels = ids.masked_fill(mask == 0, -100)
    padded_loss = model(input_ids=ids, attention_mask=mask, labels=padded_labels).loss
    padded_grads = torch.autograd.grad(padded_loss, list(model.parameters()), allow_unused=True)
    errors = [
        relative_error(a, b)
        for a, b in zip(packed_grads, padded_grads, strict=True)
        if a is not None and b is not None and b.abs().max() > 0
    ]
    model.eval()
    return abs(packed_loss.item() - padded_loss.item()), max(errors)


def lora_model(config: dict, settings: Settings, dtype, backend: str):
    """Our model with expert LoRA on the MoA and MoE experts and kv_proj; the LoRA factors random (B is
    zero-initialised, which would hide the adapters from the forward)."""
    from peft import LoraConfig, get_peft_model

    from jetmoe_ft.adapters.lora import MOA_EXPERTS, MOE_EXPERTS, register_expert_lora

    model = build_model(config, settings, dtype=dtype, backend=backend)
    suffixes = (*MOA_EXPERTS, *MOE_EXPERTS, "self_attention.kv_proj")
    targets = [name for name, _ in model.named_modules() if name.endswith(suffixes)]
    lora = register_expert_lora(
        LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r, target_modules=targets)
    )
    model = get_peft_model(model, lora)
    generator = torch.Generator(device="cpu").manual_seed(SEED + 2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    for parameter in model.parameters():
        parameter.requires_grad_(True)  # parity of every gradient, base weights included
    return model.train()


def forward_backward(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model(input_ids=ids, output_router_logits=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def check_backend_parity(settings: Settings) -> dict:
    config = settings.parity_config
    ids = token_batch(settings.parity_batch, config["vocab_size"], settings.device)
    runs = {}
    for key, dtype, backend in (
        ("reference", torch.float32, "loop"),
        ("loop", settings.dtype, "loop"),
        ("grouped_mm", settings.dtype, "grouped_mm"),
    ):
        runs[key] = forward_backward(lora_model(config, settings, dtype, backend), ids)
    (reference_logits, reference_grads) = runs["reference"]
    result, ok = {}, True
    for key in ("loop", "grouped_mm"):
        logits, grads = runs[key]
        result[f"{key}_logits_error"] = relative_error(logits, reference_logits)
        worst = max(grads, key=lambda name: relative_error(grads[name], reference_grads[name]))
        result[f"{key}_worst_grad_error"] = relative_error(grads[worst], reference_grads[worst])
        result[f"{key}_worst_grad"] = worst
    lora_grads = [name for name in runs["grouped_mm"][1] if "lora_" in name]
    result["lora_gradients_compared"] = len(lora_grads)
    ok = within_noise(result["grouped_mm_logits_error"], result["loop_logits_error"])
    ok = ok and within_noise(result["grouped_mm_worst_grad_error"], result["loop_worst_grad_error"])
    result["ok"] = ok and len(lora_grads) > 0
    return result


def check_qlora_step(settings: Settings) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise Skip(f"bitsandbytes is not importable ({error})") from None
    from trl import SFTConfig

    from jetmoe_ft.adapters.adapt import adapt_model
    from jetmoe_ft.config import parse_recipe
    from jetmoe_ft.loading import load_recipe_model

    config = settings.parity_config
    with tempfile.TemporaryDirectory() as folder:
        base = build_model(config, settings).to("cpu", torch.bfloat16)
        base.save_pretrained(Path(folder) / "base")
        del base
        recipe_file = Path(folder) / "qlora.yaml"
        recipe_file.write_text(
            f"model_name_or_path: {Path(folder) / 'base'}\ndataset_name: chatterbot\nload_in_4bit: true\n"
            f"dtype: bfloat16\nlora_targets: [moa_experts, moe_experts, kv_proj]\nlora_r: {settings.lora_r}\n"
            f"bf16: {str(settings.device == 'cuda').lower()}\noutput_dir: {Path(folder) / 'out'}\nreport_to: none\n"
        )
        recipe = parse_recipe(SFTConfig, ["--config", str(recipe_file)])
        reset_memory(settings.device)
        model = adapt_model(recipe, load_recipe_model(recipe)).to(settings.device)
    frozen = {name: buffer.clone() for name, buffer in model.named_buffers() if "weight_4bit" in name}
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = token_batch(settings.parity_batch, config["vocab_size"], settings.device)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    moved = sum(
        not torch.equal(p.detach(), trainable[n]) for n, p in model.named_parameters() if n in trainable
    )
    buffers = dict(model.named_buffers())
    untouched = all(torch.equal(buffers[name], before) for name, before in frozen.items())
    return {
        "ok": math.isfinite(loss.item()) and moved > 0 and untouched and len(frozen) > 0,
        "loss": loss.item(),
        "quantized_expert_weights": len(frozen),
        "trainable_tensors": len(trainable),
        "trainable_tensors_moved": moved,
        "peak_memory_gib": peak_memory_gib(settings.device),
    }


def check_train_throughput(settings: Settings) -> dict:
    import transformers

    from jetmoe_ft import JetMoeForCausalLM

    config = settings.bench_config
    ids = token_batch(settings.bench_batch, config["vocab_size"], settings.device)
    tokens = ids.numel()
    result = {
        "parameters": count_parameters(config),
        "batch": list(settings.bench_batch),
        "dtype": "bfloat16",
    }
    for name in ("ours", "transformers"):
        reset_memory(settings.device)
        torch.manual_seed(SEED)
        with torch.device(settings.device):
            reference = transformers.JetMoeForCausalLM(
                transformers.JetMoeConfig(**config, attn_implementation="sdpa")
            ).to(settings.dtype)
            if name == "ours":
                from jetmoe_ft import JetMoeConfig

                model = JetMoeForCausalLM(JetMoeConfig(**config, attn_implementation="sdpa")).to(
                    settings.dtype
                )
                model.load_state_dict(reference.state_dict())
                del reference
            else:
                model = reference
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        times, losses = [], []
        for step in range(settings.warmup_steps + settings.timed_steps):
            synchronize(settings.device)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(settings.device)
            losses.append(loss.item())
            if step >= settings.warmup_steps:
                times.append(time.perf_counter() - start)
        result[f"{name}_tokens_per_s"] = round(tokens / statistics.median(times), 1)
        result[f"{name}_peak_memory_gib"] = peak_memory_gib(settings.device)
        result[f"{name}_first_loss"] = losses[0]
        del model, optimizer
    result["speedup"] = round(result["ours_tokens_per_s"] / result["transformers_tokens_per_s"], 3)
    result["same_first_loss"] = abs(result["ours_first_loss"] - result["transformers_first_loss"]) < 0.05
    result["ok"] = result["same_first_loss"] and all(
        math.isfinite(result[f"{name}_first_loss"]) for name in ("ours", "transformers")
    )
    return result


CHECK_FUNCTIONS: dict[str, Callable[[Settings], dict]] = {
    "environment": check_environment,
    "flash_vs_sdpa": check_flash_vs_sdpa,
    "padding_free": check_padding_free,
    "backend_parity": check_backend_parity,
    "qlora_step": check_qlora_step,
    "train_throughput": check_train_throughput,
}


# ---------------------------------------------------------------------------------------------- running


def run_check(name: str, settings: Settings, deadline: float) -> dict:
    """One check as one record: status ok / fail / skipped / error, its numbers, and its seconds."""
    start = time.perf_counter()
    record = {"check": name, "dry_run": settings.device == "cpu"}
    try:
        if time.perf_counter() > deadline:
            raise Skip("out of time: the run's budget was spent by the checks before this one")
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON lines only
            result = CHECK_FUNCTIONS[name](settings)
        ok = result.pop("ok", True)
        record |= {"status": "ok" if ok else "fail", **result}
    except Skip as reason:
        record |= {"status": "skipped", "reason": str(reason)}
    except Exception as error:  # noqa: BLE001 - every check reports, whatever breaks
        record |= {"status": "error", "error": f"{type(error).__name__}: {error}"[:500]}
        traceback.print_exc(file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            reset_memory(settings.device)
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run every check on CPU with a tiny model")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {CHECKS}")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no new check starts after this")
    parser.add_argument("--output", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    args.checks = [name.strip() for name in args.checks.split(",") if name.strip()]
    unknown = sorted(set(args.checks) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    return args


def emit(record: dict, output: Path | None) -> None:
    line = json.dumps(record, default=str)
    print(line, flush=True)
    if output is not None:
        with output.open("a") as handle:
            handle.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        emit({"check": "environment", "status": "fail", "error": NO_CUDA}, args.output)
        return 2
    settings = settings_for(args.dry_run)
    if args.dry_run:
        torch.set_num_threads(1)  # a smoke test; several threads on a busy small machine only spin
    deadline = time.perf_counter() + args.budget_s
    statuses = []
    for name in args.checks:
        record = run_check(name, settings, deadline)
        statuses.append(record["status"])
        emit(record, args.output)
    return 1 if any(status in ("fail", "error") for status in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
