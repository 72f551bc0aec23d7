"""`export_run`: a run directory -> a verified transformers checkpoint in a fresh directory, or nothing.

Input mistakes are one line (`RecipeError`) before anything is written. Everything is written into a temporary
directory beside the output and renamed onto it only after checks 1-4 passed; any failure removes it. Then, and
only then, `--push_to_hub`.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..config import RecipeError
from . import card, checks, merge, peft_format, probes, publish
from .checks import FreshProcess
from .manifest import describe
from .sources import (
    Source,
    dequantized_base,
    load_base_model,
    load_run_model,
    load_run_tokenizer,
    read_source,
)

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


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
    """Export the run in `model` to `output` (see the module docstring); returns `output`. `fresh`: a running
    fresh-process checker to reuse (else one is started for this export)."""
    started = time.time()
    output = Path(output).expanduser().absolute()
    check_output(output)
    source = read_source(model)
    dtype = resolve_dtype(dtype, source)
    if push_to_hub:
        publish.check_repo_id(push_to_hub)
    peft_base = peft_format.resolve_base(source, base) if peft_adapter else None
    tokenizer = load_run_tokenizer(source)
    rows = probes.make_probes(tokenizer, source)
    done: list[dict] = []
    run_model, base_state = check_against_base(done, source, rows, dtype)
    if peft_base is not None:
        peft_format.verify_base(peft_base, base_state, source)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        torch_dtype = getattr(torch, dtype)
        written = merge.write_model(run_model, tokenizer, staging, torch_dtype, max_shard_size)
        reference = probes.write_probe(run_model, rows, staging / "probe.safetensors", source)
        del run_model
        checks.check_tensors(done, staging, source, base_state, dtype, written["tied_embeddings"])
        info = describe(source, dtype, written)
        if source.kind == "qlora":
            info["qlora"] = probes.qlora_distance(source, rows, reference)
        if peft_base is not None:
            packing = peft_format.write_stock_adapter(source.path, staging / "adapter", peft_base["name"])
            info["peft_adapter"] = {
                "base": peft_base["name"],
                "base_tensors_equal_to_run_base": peft_base.get("tensors_equal_to_run_base"),
                "packing": packing,
            }
        # the card shows the final names; the fresh process runs the same snippets on the staged files
        adapter = peft_base is not None
        shown_id = push_to_hub or str(output)
        shown_adapter = (
            f'{push_to_hub!r}, subfolder="adapter"' if push_to_hub else repr(str(output / "adapter"))
        )
        base_name = peft_base["name"] if adapter else None
        shown = card.snippets(source, rows[0], shown_id, shown_adapter if adapter else None, base_name)
        staged = card.snippets(
            source, rows[0], str(staging), repr(str(staging / "adapter")) if adapter else None, base_name
        )
        expected = card.expected_output(source, tokenizer, reference)
        spec = checks.fresh_spec(source, staging, dtype, rows, staged, expected, peft_base)
        with nullcontext(fresh) if fresh is not None else FreshProcess() as process:
            result = process.check(spec)
        checks.record_fresh(done, result, peft=adapter)

        info["checks"] = done
        info["tolerances"] = {**checks.TOLERANCES[dtype], "fine_tune_factor": checks.FINE_TUNE_FACTOR}
        info["elapsed_s"] = round(time.time() - started, 1)
        card.write_card(staging, output.name, info, shown, shown_id, card.read_metrics(source.path))
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


def check_against_base(
    done: list[dict], source: Source, rows: list[dict], dtype: str
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Check 1 on the run's merged model and its base; returns the run's model (fp32) and the base's tensors that
    check 2 compares with (QLoRA: the dequantized 4-bit base the adapter trained on)."""
    base_model = load_base_model(source)
    run_model = load_run_model(source)
    reference_dispatch(run_model)
    reference_dispatch(base_model)
    head = source.task == "sequence_classification"
    input_ids = [row["input_ids"] for row in rows]
    run_fp32 = checks.probe_outputs(run_model, input_ids, backbone=head)
    base_fp32 = checks.probe_outputs(base_model, input_ids, backbone=head)
    run_in_dtype = checks.probe_outputs(run_model.to(getattr(torch, dtype)), input_ids, backbone=head)
    run_model.float()
    head_moved = None
    if head:  # a head new to the base (a language model's) or trained
        head_moved = not checks.base_has_head(source) or not torch.equal(
            run_model.score.weight, base_model.score.weight
        )
    checks.check_fine_tune(done, source, run_fp32, run_in_dtype, base_fp32, dtype, head_moved)
    if source.kind == "qlora":
        base_model = dequantized_base(source)
    base_state = {name: tensor.detach() for name, tensor in base_model.state_dict().items()}
    if getattr(base_model.config, "tie_word_embeddings", False):
        base_state.pop("lm_head.weight", None)
    return run_model, base_state


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
    """DIR must be new or empty: the export never overwrites."""
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


def write_failure(error: Exception, output: Path) -> str:
    """The one line for a write that failed (a full disk, a file-size limit, a read-only folder)."""
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
    """`Exported ... in N s; checks 1-4 passed; transformers' logits within E of the run's.`"""
    figures = {check["check"]: check for check in info["checks"]}
    fresh = figures.get("3 fresh load", {})
    kind = info["source"]["kind"].replace("_", " ")
    parts = [
        f"Exported {kind} to {output} ({info['dtype']}) in {info['elapsed_s']:.0f} s",
        f"checks 1-{4 if '4 stock peft' in figures else 3} passed",
    ]
    if "max_abs_error" in fresh:
        parts.append(f"transformers' logits within {fresh['max_abs_error']:.2g} of the run's")
    return "; ".join(parts) + "."
