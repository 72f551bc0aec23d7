"""`export_run`: a run directory -> a verified transformers checkpoint in a fresh directory, or nothing.

Everything is written into a temporary directory beside the output and renamed onto it only after checks 1-4
passed; any failure removes it. Then, and only then, `--push_to_hub`.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer

from ..config import RecipeError
from ..loading import TINY_NAMES, is_adapter_dir
from ..training.model_card import LOOPS
from . import card, checks, merge, peft_format, publish
from .checks import FreshProcess
from .sources import Source, dequantized_base, load_base_model, load_run_model, quantized_model, read_source

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}
PROBE_MESSAGES = (
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "user", "content": "What is a computer?"}],
    [{"role": "user", "content": "Tell me a joke about robots."}],
)
PROBE_TEXTS = ("A warm, funny and clever film.", "Dull, long and badly acted.", "It was a movie.")
REWARD_ANSWERS = ("I am fine, thank you.", "A machine that computes.", "No.")
GREEDY_TOKENS = 16


def export_run(
    model: str | Path,
    output: str | Path,
    dtype: str | None = None,
    peft_adapter: bool = False,
    base: str | None = None,
    push_to_hub: str | None = None,
    max_shard_size: str = "5GB",
    fresh: FreshProcess | None = None,
) -> Path:
    """Export the run in `model` to `output` (see the module docstring); returns `output`."""
    started = time.time()
    output = Path(output).expanduser().absolute()
    check_output(output)
    source = read_source(model)
    dtype = resolve_dtype(dtype, source)
    if push_to_hub:
        publish.check_repo_id(push_to_hub)
    peft_base = resolve_peft_base(source, base) if peft_adapter else None
    tokenizer = load_run_tokenizer(source)
    probes = make_probes(tokenizer, source)
    rows = [probe["input_ids"] for probe in probes]

    base_model = load_base_model(source)
    run_model = load_run_model(source)
    check_finite(run_model, source)
    reference_dispatch(run_model)
    reference_dispatch(base_model)
    check_list: list[dict] = []
    torch_dtype = getattr(torch, dtype)
    head = source.task == "sequence_classification"
    run_fp32 = checks.probe_outputs(run_model, rows, backbone=head)
    base_fp32 = checks.probe_outputs(base_model, rows, backbone=head)
    run_model.to(torch_dtype)
    run_in_dtype = checks.probe_outputs(run_model, rows, backbone=head)
    run_model.float()
    head_moved = None
    if head:  # a head new to the base (a language model's) or trained
        head_moved = not checks.base_has_head(source) or not torch.equal(
            run_model.score.weight, base_model.score.weight
        )
    checks.check_fine_tune(check_list, source, run_fp32, run_in_dtype, base_fp32, dtype, head_moved)
    if source.kind == "qlora":  # QLoRA trained on the dequantized 4-bit base: that is what it did not change
        base_model = dequantized_base(source)
    base_state = {name: tensor.detach() for name, tensor in base_model.state_dict().items()}
    if getattr(base_model.config, "tie_word_embeddings", False):
        base_state.pop("lm_head.weight", None)
    del base_model

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        written = merge.write_model(run_model, tokenizer, staging, torch_dtype, max_shard_size)
        reference = write_probe(run_model, probes, staging / "probe.safetensors", source)
        checks.check_tensors(check_list, staging, source, base_state, dtype, written["tied_embeddings"])
        info = describe(source, dtype, written, started)
        if source.kind == "qlora":
            info["qlora"] = qlora_distance(source, probes, reference, torch_dtype)
        packing = None
        if peft_base is not None:
            verify_peft_base(peft_base, base_state)
            packing = peft_format.write_stock_adapter(source.path, staging / "adapter", peft_base["name"])
            info["peft_adapter"] = {"base": peft_base["name"], "packing": packing}
        snippets = make_snippets(source, staging, output, push_to_hub, probes, reference, peft_base)
        spec = fresh_spec(source, staging, dtype, probes, snippets, peft_base)
        own = fresh is None
        fresh = fresh or FreshProcess()
        try:
            result = fresh.check(spec)
        finally:
            if own:
                fresh.close()
        checks.record_fresh(check_list, result, peft=peft_base is not None)
        info["checks"] = check_list
        info["tolerances"] = {**checks.TOLERANCES[dtype], "fine_tune_factor": checks.FINE_TUNE_FACTOR}
        info["elapsed_s"] = round(time.time() - started, 1)
        shown = {"model": snippets["model_display"], "model_id": snippets["model_id"]}
        if "adapter_display" in snippets:
            shown["adapter"] = snippets["adapter_display"]
        card.write_card(staging, info, shown, card.read_metrics(source.path))
        (staging / "export.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
        if output.exists():
            output.rmdir()  # empty (check_output): the rename needs the name free
        staging.rename(output)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, SafetensorError) and "I/O error" not in str(error):
            raise
        raise RecipeError(write_failure(error, output)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(summary_line(info, output))
    if push_to_hub:
        url = publish.push(output, push_to_hub)
        print(f"Pushed to {push_to_hub}: {url}")
    return output


def reference_dispatch(model) -> None:
    """The expert matmuls one expert at a time, rows unpadded: the order of operations of transformers' own JetMoe,
    so in bf16 the reference differs from transformers by nothing but the attention kernel (and routing near-ties
    do not flip on our side alone)."""
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = "loop"
        if hasattr(module, "row_multiple"):
            module.row_multiple = 1


def check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise RecipeError(
            f"--output: {output} already holds files; give a new or empty directory (the export never overwrites)."
        )


def resolve_dtype(dtype: str | None, source: Source) -> str:
    """`--dtype bf16|fp32`; unset: the dtype the run trained in (bf16 recipes bf16, else fp32)."""
    if dtype is None:
        trained_bf16 = (
            str(source.recipe.get("bf16")).lower() == "true" or source.recipe.get("dtype") == "bfloat16"
        )
        return "bfloat16" if trained_bf16 else "float32"
    if dtype not in DTYPES:
        raise RecipeError(f"--dtype: expected bf16 or fp32, got {dtype!r}.")
    return DTYPES[dtype]


def resolve_peft_base(source: Source, base: str | None) -> dict[str, Any]:
    """Where stock PEFT finds the adapter's base: a real directory or hub id, or one line naming `--base`."""
    if not source.is_adapter:
        raise RecipeError(
            f"--peft_adapter: {source.path} is a full model, not an adapter; export it without the flag."
        )
    if source.kind == "qlora":
        raise RecipeError(
            "--peft_adapter: a QLoRA adapter was trained on dequantized 4-bit experts, which no stock base holds "
            "(transformers' bitsandbytes path leaves JetMoE's experts unquantized); use the merged export."
        )
    name = base or source.base
    if base is None and name in TINY_NAMES:
        raise RecipeError(
            f"--base: the adapter's base {name} is built by jetmoe-ft, not a directory or hub id PEFT can load; "
            "pass --base DIR, a saved copy of that base (e.g. `build_tiny_model(seed).save_pretrained(DIR)`)."
        )
    if base is None and is_adapter_dir(name):
        raise RecipeError(
            f"--base: the adapter's base is the adapter {name}, which stock PEFT cannot stack; export that run first "
            f"(`jetmoe-ft export --model {name} --output DIR`) and pass --base DIR."
        )
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise RecipeError(
                f"--base: {name} holds no model (config.json); give the base model's directory."
            )
        return {"name": str(local.absolute()), "local": True}
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise RecipeError(f"--base: no such directory {name}.")
    if name != source.base:
        raise RecipeError(
            f"--base: the hub id {name} is not the base the run started from ({source.base}); the export can only "
            "vouch for that one: pass it, or a local copy as a directory."
        )
    return {"name": name, "local": False}


def verify_peft_base(peft_base: dict[str, Any], base_state: dict[str, torch.Tensor]) -> None:
    """A `--base` directory must hold the run's base, tensor for tensor (in the directory's dtype)."""
    if not peft_base["local"]:
        return
    folder, seen = Path(peft_base["name"]), set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                expected = base_state.get(key)
                if expected is None and key == "lm_head.weight":
                    expected = base_state.get("model.embed_tokens.weight")
                if expected is None or not torch.equal(tensor, expected.to(tensor.dtype)):
                    raise RecipeError(
                        f"--base: {folder} is not the model the adapter was trained on ({key} differs); pass the "
                        "run's base."
                    )
                seen.add(key)
    missing = sorted(set(base_state) - seen)
    if missing:
        raise RecipeError(f"--base: {folder} lacks {len(missing)} tensors of the run's base ({missing[0]}).")
    peft_base["tensors_equal_to_run_base"] = len(seen)


def load_run_tokenizer(source: Source):
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"--model: cannot load the tokenizer in {source.path} ({str(error).splitlines()[0][:200]})."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def make_probes(tokenizer, source: Source) -> list[dict[str, Any]]:
    """The probe inputs: chat prompts for a language model, texts (or rated conversations) for a head."""
    probes = []
    if source.head == "classifier":
        for text in PROBE_TEXTS:
            probes.append({"text": text, "input_ids": torch.tensor(tokenizer(text)["input_ids"])})
        return probes
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


@torch.no_grad()
def write_probe(model, probes: list[dict], path: Path, source: Source) -> dict[str, Any]:
    """probe.safetensors: inputs, the run's own logits, greedy tokens and router top-k in the export's dtype."""
    tensors: dict[str, torch.Tensor] = {"count": torch.tensor(len(probes))}
    k = model.config.num_experts_per_tok
    reference: dict[str, Any] = {"logits": [], "greedy": []}
    for index, probe in enumerate(probes):
        input_ids = probe["input_ids"][None]
        logits = model(input_ids=input_ids).logits
        logits = logits[0] if source.task == "causal_lm" else logits
        tensors[f"{index}/input_ids"] = probe["input_ids"]
        tensors[f"{index}/logits"] = logits.float().contiguous()
        reference["logits"].append(logits.float())
        routed = probe["input_ids"]
        if source.task == "causal_lm":
            generated = model.generate(
                input_ids,
                max_new_tokens=GREEDY_TOKENS,
                do_sample=False,
                pad_token_id=model.config.pad_token_id,
                eos_token_id=model.generation_config.eos_token_id,
            )[0, input_ids.shape[1] :]
            generated = _until_eos(generated, model.generation_config.eos_token_id)
            tensors[f"{index}/greedy"] = generated
            reference["greedy"].append(generated)
            routed = torch.cat([routed, generated])
        routed_output = model(input_ids=routed[None], output_router_logits=True)
        router_logits = routed_output.router_logits
        tensors[f"{index}/routed_ids"] = routed
        if source.task == "causal_lm":
            tensors[f"{index}/routed_logits"] = routed_output.logits[0].float().contiguous()
        tensors[f"{index}/topk"] = torch.stack([r.float().topk(k, dim=-1).indices for r in router_logits])
        tensors[f"{index}/router_logits"] = torch.stack([r.float() for r in router_logits]).contiguous()
    save_file(tensors, str(path))
    return reference


def _until_eos(tokens: torch.Tensor, eos) -> torch.Tensor:
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for position, token in enumerate(tokens.tolist()):
        if token in eos:
            return tokens[: position + 1]
    return tokens


def check_finite(model, source: Source) -> None:
    bad = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise RecipeError(
            f"--model: {source.path} holds NaN or Inf weights ({len(bad)} tensors, e.g. {bad[0]}); the run diverged: "
            "export an earlier checkpoint."
        )


@torch.no_grad()
def qlora_distance(source: Source, probes: list[dict], reference: dict, dtype: torch.dtype) -> dict[str, Any]:
    """How far the merged export is from the 4-bit model the adapter was trained with, on the probe prompts."""
    from .sources import quantization_settings

    four_bit = quantized_model(source)
    errors, kls, greedy_same = [], [], True
    for index, probe in enumerate(probes):
        input_ids = probe["input_ids"][None]
        logits = four_bit(input_ids=input_ids).logits
        logits = (logits[0] if source.task == "causal_lm" else logits).float()
        ours = reference["logits"][index]
        errors.append((logits - ours).abs().max().item())
        log_p, log_q = torch.log_softmax(logits.double(), -1), torch.log_softmax(ours.double(), -1)
        kls.append(max((log_p.exp() * (log_p - log_q)).sum(-1).mean().item(), 0.0))
        if source.task == "causal_lm":
            expected = reference["greedy"][index]
            generated = four_bit.generate(
                input_ids=input_ids,
                max_new_tokens=expected.numel(),
                do_sample=False,
                pad_token_id=four_bit.config.pad_token_id,
            )[0, input_ids.shape[1] :]
            greedy_same &= torch.equal(generated[: expected.numel()], expected)
    return {
        **quantization_settings(source),
        "max_abs_logit_difference": max(errors),
        "mean_kl": sum(kls) / len(kls),
        "greedy_identical": bool(greedy_same),
        "compared_with": "the 4-bit model with the adapter (jetmoe-ft's dispatch), fp32 logits",
    }


def make_snippets(source, staging, output, push_to_hub, probes, reference, peft_base) -> dict[str, Any]:
    """The usage snippets: the card shows them with the final id, the fresh check runs them on the staged files."""
    shown_id = push_to_hub or str(output)
    probe = probes[0]
    snippets: dict[str, Any] = {
        "model_id": shown_id,
        "model_display": card.usage_snippet(shown_id, source.task, probe, GREEDY_TOKENS),
        "model_run": card.usage_snippet(str(staging), source.task, probe, GREEDY_TOKENS),
    }
    if source.task == "causal_lm":
        tokenizer = AutoTokenizer.from_pretrained(str(staging))
        snippets["expected"] = tokenizer.decode(reference["greedy"][0], skip_special_tokens=True).strip()
    elif source.head == "reward":
        snippets["expected"] = float(reference["logits"][0].reshape(-1)[0])
    else:
        snippets["expected"] = source.config.id2label[int(reference["logits"][0].reshape(-1).argmax())]
    if peft_base is not None:
        kwargs = _base_kwargs(source)
        shown = f'{push_to_hub!r}, subfolder="adapter"' if push_to_hub else repr(str(output / "adapter"))
        for key, adapter in (("adapter_display", shown), ("adapter_run", repr(str(staging / "adapter")))):
            snippets[key] = card.adapter_snippet(
                peft_base["name"], adapter, source.task, probe, GREEDY_TOKENS, kwargs
            )
    return snippets


def _base_kwargs(source: Source) -> dict[str, Any]:
    if source.task != "sequence_classification":
        return {}
    return {"num_labels": source.config.num_labels, "pad_token_id": source.config.pad_token_id}


def fresh_spec(source, staging: Path, dtype: str, probes, snippets, peft_base) -> dict[str, Any]:
    config = json.loads((staging / "config.json").read_text())
    expected = {
        key: value for key, value in config.items() if key not in ("transformers_version", "architectures")
    }
    spec = {
        "export_dir": str(staging),
        "dtype": dtype,
        "task": source.task,
        "probe": str(staging / "probe.safetensors"),
        "expected_config": expected,
        "conversations": [
            {key: probe[key] for key in ("messages", "generation_prompt", "text") if key in probe}
            for probe in probes
        ],
        "tolerances": checks.TOLERANCES[dtype],
        "model_snippet": snippets.get("model_run"),
        "model_snippet_expected": snippets["expected"],
        "peft": None,
    }
    if peft_base is not None:
        spec["peft"] = {
            "adapter_dir": str(staging / "adapter"),
            "base": peft_base["name"],
            "base_kwargs": _base_kwargs(source),
        }
        spec["adapter_snippet"] = snippets["adapter_run"]
        spec["adapter_snippet_expected"] = snippets["expected"]
    return spec


def describe(source: Source, dtype: str, written: dict[str, Any], started: float) -> dict[str, Any]:
    """The head of export.json: what was exported, from what, with which libraries."""
    base_model = source.base if _is_hub_id(source.base) else None
    return {
        "format": 1,
        "source": {
            "path": str(source.path.absolute()),
            "kind": source.kind,
            "sha256": files_digest(source.path),
        },
        "base": {"name": source.base, "sha256": base_digest(source)},
        "base_model": base_model,
        "task": source.task,
        "head": source.head,
        "loop": run_loop(source),
        "datasets": _datasets(source.recipe),
        "model_class": "JetMoeForSequenceClassification"
        if source.task == "sequence_classification"
        else "JetMoeForCausalLM",
        "dtype": dtype,
        "versions": versions(),
        "written": written,
    }


def run_loop(source: Source) -> str:
    """The loop that wrote the run: the tag its model card carries (`jetmoe-ft <loop>`), else `sft`."""
    readme = source.path / "README.md"
    if readme.is_file():
        text = readme.read_text()
        if text.startswith("---"):
            front = yaml.safe_load(text.split("---")[1]) or {}
            tags = [tag for tag in front.get("tags") or [] if tag in set(LOOPS.values()) | {"rm"}]
            if tags:
                return tags[0]
    return {"reward": "rm", "classifier": "cls"}.get(source.head, "sft")


def _datasets(recipe: dict) -> list[str]:
    if recipe.get("dataset_name"):
        return [str(recipe["dataset_name"])]
    return [str(entry.get("path")) for entry in recipe.get("datasets") or [] if isinstance(entry, dict)]


def _is_hub_id(name: str) -> bool:
    return (
        name not in TINY_NAMES
        and not Path(name).expanduser().exists()
        and name.count("/") == 1
        and not name.startswith((".", "/", "~"))
    )


def files_digest(folder: Path) -> str:
    """sha256 over a directory's weight and config files (names and bytes)."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*config.json")):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def base_digest(source: Source) -> str:
    if source.base_is_tiny:
        return f"jetmoe-ft/tiny model_seed {source.seed}"
    local = Path(source.base).expanduser()
    return files_digest(local) if local.is_dir() else f"hub {source.base}"


def versions() -> dict[str, str]:
    names = ("torch", "transformers", "peft", "safetensors", "huggingface_hub", "jetmoe-ft")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_failure(error: Exception, output: Path) -> str:
    text = str(error)
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or any(
        reason in text for reason in ("No space left", "File too large", "Disk quota")
    ):
        reason = getattr(error, "strerror", None) or text.split("I/O error: ")[-1].split(" (os error")[0]
        return (
            f"--output: no space left to write the export to {output.parent} ({reason}); nothing was written."
        )
    reason = getattr(error, "strerror", None) or text.splitlines()[0][:200]
    return f"--output: cannot write the export to {output} ({reason}); nothing was written."


def summary_line(info: dict[str, Any], output: Path) -> str:
    figures = {check["check"]: check for check in info["checks"]}
    fresh = figures.get("3 fresh load", {})
    parts = [
        f"Exported {info['source']['kind'].replace('_', ' ')} to {output} ({info['dtype']}) in {info['elapsed_s']:.0f} s"
    ]
    parts.append(f"checks 1-{4 if '4 stock peft' in figures else 3} passed")
    if "max_abs_error" in fresh:
        parts.append(f"transformers' logits within {fresh['max_abs_error']:.2g} of the run's")
    return "; ".join(parts) + "."
