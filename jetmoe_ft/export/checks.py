"""The checks an export passes before anything is published, in order; each failure is one line naming the check and
its figure (`ExportRefused`, exit status 5).

1. `check_fine_tune`: the run's logits on the probe prompts differ from its base's by clearly more than the tolerance.
2. `check_tensors`: tensor by tensor, reading the written files one tensor at a time: every adapted tensor equals
   base + scale · B_e · A_e (computed here in fp32 from the adapter file, not by the merge that wrote it), every
   tensor the run did not train is bit-identical to the base; a full model's tensors are the run's own.
3. and 4. run in a fresh process that cannot import `jetmoe_ft` (`FreshProcess`, `fresh_check.py`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..config import RecipeError
from .probes import mean_kl
from .sources import Source

TOLERANCES = {
    "float32": {
        "logits_atol": 1e-4,
        "kl_max": 1e-6,
        "router_agreement_min": 0.999,
        "merge_rtol": 1e-6,
        "merge_atol_of_max": 2**-20,
        "score_atol": 1e-4,
        "tensor_rtol": 0.0,
        "peft_token_gates": True,
    },
    "bfloat16": {
        "logits_atol": None,  # bf16: max error reported, KL and greedy tokens decide
        "kl_max": 1e-3,
        "router_agreement_min": 0.999,
        "merge_rtol": 2**-7,  # one bf16 rounding of values that differ in their last fp32 bits
        "merge_atol_of_max": 2**-20,
        "score_atol": 5e-2,
        "tensor_rtol": 2**-8,  # the written tensor is the fp32 merge rounded once to bf16
        # stock PEFT on a bf16 base adds the delta in bf16 on every forward (a second rounding, not the export's):
        # its KL is gated; its greedy tokens, router top-k and snippet are reported (near-ties flip on a tiny model)
        "peft_token_gates": False,
    },
}
"""Per export dtype. `fine_tune_factor`: check 1 wants the run to move the logits `FINE_TUNE_FACTOR` times more than
the tolerance (fp32: `logits_atol`; bf16: the bf16 rounding noise of the run's own logits)."""
FINE_TUNE_FACTOR = 10.0
FP32_SUM_RTOL = 2**-20
"""fp32: merged and reference are two fp32 sums of the same terms (a few roundings of |base| + |B||A|)."""


class ExportRefused(RuntimeError):
    """A check failed: nothing is published and the output directory is not written."""


def record(checks: list[dict], name: str, passed: bool, failure: str | None = None, **figures) -> dict:
    """Append one check's entry (as export.json holds it); a failed check raises `ExportRefused`."""
    entry = {"check": name, "passed": passed, **({"failure": failure} if failure else {}), **figures}
    checks.append(entry)
    if not passed:
        raise ExportRefused(f"export refused by check {name}: {failure}")
    return entry


# -- check 1 -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def probe_outputs(model: nn.Module, rows: list[torch.Tensor], backbone: bool = False) -> list[torch.Tensor]:
    """Logits (or the backbone's last hidden states) of `model` on each probe row, in fp32."""
    outputs = []
    for input_ids in rows:
        if backbone:
            outputs.append(model.model(input_ids=input_ids[None]).last_hidden_state[0].float())
        else:
            logits = model(input_ids=input_ids[None]).logits
            outputs.append(logits[0].float() if logits.ndim == 3 else logits.float())
    return outputs


def check_fine_tune(
    checks: list[dict],
    source: Source,
    run_fp32,
    run_in_dtype,
    base_fp32,
    dtype: str,
    head_moved: bool | None = None,
) -> dict:
    """Check 1: the fine-tune is there. Outputs on the probe rows: the run's in fp32 and in the export dtype, the
    base's in fp32 (for a head: the backbone's last hidden states). The run must move them `FINE_TUNE_FACTOR` times
    more than the fp32 tolerance; in bf16 also its KL from the base `FINE_TUNE_FACTOR` times more than the KL bf16
    rounding alone brings."""
    threshold = FINE_TUNE_FACTOR * TOLERANCES["float32"]["logits_atol"]
    moved = max((a - b).abs().max().item() for a, b in zip(run_fp32, base_fp32, strict=True))
    figures: dict[str, Any] = {"max_difference_from_base": moved, "threshold": threshold}
    passed = moved > threshold
    failure = (
        f"the run's {'logits' if head_moved is None else 'backbone'} differ from its base {source.base} by {moved:.3g}, "
        f"not clearly more than the tolerance ({threshold:.3g} = {FINE_TUNE_FACTOR:g} x "
        f"{TOLERANCES['float32']['logits_atol']:g}): the fine-tune changes nothing"
    )
    if passed and dtype != "float32" and head_moved is None:
        figures["kl_from_base"] = mean_kl(run_fp32, base_fp32)
        figures["kl_of_rounding"] = mean_kl(run_fp32, run_in_dtype)
        passed = figures["kl_from_base"] > FINE_TUNE_FACTOR * figures["kl_of_rounding"]
        failure = (
            f"in {dtype} the run's KL from its base ({figures['kl_from_base']:.3g}) is not clearly more than what "
            f"{dtype} rounding alone brings ({figures['kl_of_rounding']:.3g}, x {FINE_TUNE_FACTOR:g}): the fine-tune "
            "would not survive the export; export in fp32"
        )
    if head_moved is not None:
        figures["head_new_or_changed"] = head_moved
        passed = passed or head_moved
        failure = failure + " and the head is the base's"
    return record(checks, "1 fine-tune present", passed, None if passed else failure, **figures)


def base_has_head(source: Source) -> bool:
    """Whether the run's base directory holds a classification head of its own (`score`)."""
    base = Path(source.base)
    if not base.is_dir():
        return False
    for file in base.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            if any(key.startswith("score.") or ".score." in key for key in handle.keys()):
                return True
    return False


# -- check 2 -------------------------------------------------------------------------------------------------------


def exported_tensors(folder: Path):
    """(name, tensor) of every tensor in `folder`'s safetensors files, read one at a time."""
    for file in sorted(folder.glob("*.safetensors")):
        if file.name == "probe.safetensors":
            continue
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


class AdapterDelta:
    """The adapter file's own factors: `delta(name)` = scale · B_e · A_e per expert (fp32), or the tensor a
    `modules_to_save` entry replaces. Expert factors: A [E, r, in], B [E, out, r]; dense: A [r, in], B [out, r]."""

    def __init__(self, adapter_dir: Path):
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise RecipeError(
                f"--model: {adapter_dir} uses rank_pattern / alpha_pattern, which the export does not check; "
                "train with one lora_r."
            )
        rank, alpha = config["r"], config["lora_alpha"]
        self.scale = alpha / (rank**0.5 if config.get("use_rslora") else rank)
        self.factors: dict[str, dict[str, torch.Tensor]] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        for key, value in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
            name = key.removeprefix("base_model.model.")
            match = re.match(r"(.+)\.(lora_A|lora_B)\.weight$", name)
            if match:
                self.factors.setdefault(match.group(1) + ".weight", {})[match.group(2)] = value.float()
            else:
                self.replaced[name] = value.float()

    def trained(self) -> set[str]:
        return set(self.factors) | set(self.replaced)

    def expected(self, name: str, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expected fp32 tensor, rounding bound scale |base| + |scale·B||A|)."""
        if name in self.replaced:
            return self.replaced[name], self.replaced[name].abs()
        pair = self.factors.get(name)
        if pair is None:
            return base, base.abs()
        factor_a, factor_b = pair["lora_A"], pair["lora_B"]
        equation = "eor,eri->eoi" if factor_a.ndim == 3 else "or,ri->oi"
        delta = torch.einsum(equation, factor_b, factor_a) * self.scale
        size = torch.einsum(equation, factor_b.abs(), factor_a.abs()) * self.scale
        return base + delta, base.abs() + size


def check_tensors(
    checks: list[dict],
    folder: Path,
    source: Source,
    base_state: dict[str, torch.Tensor],
    dtype: str,
    tied: bool,
) -> dict:
    """Check 2, streaming over the written tensors."""
    torch_dtype = getattr(torch, dtype)
    adapter = AdapterDelta(source.path) if source.is_adapter else None
    run_tensors = None if adapter else _RunTensors(source.path)
    frozen = frozen_tensors(source, base_state)
    written, trained, untouched, worst, worst_name = set(), 0, 0, 0.0, None
    rtol = TOLERANCES[dtype]["tensor_rtol"]
    for name, tensor in exported_tensors(folder):
        written.add(name)
        if name not in base_state:
            return record(checks, "2 tensors", False, f"{name} is in the export but not in the base model")
        base = base_state[name].float()
        if tied and name == "model.embed_tokens.weight" and adapter and "lm_head.weight" in adapter.replaced:
            name_for_adapter = "lm_head.weight"
        else:
            name_for_adapter = name
        if adapter is not None:
            expected, size = adapter.expected(name_for_adapter, base)
            is_trained = name_for_adapter in adapter.trained()
        else:
            expected = run_tensors.get(name).float()
            size = expected.abs()
            is_trained = not torch.equal(expected, base)
        if tensor.dtype != torch_dtype:
            return record(checks, "2 tensors", False, f"{name} is written in {tensor.dtype}, not {dtype}")
        if not torch.isfinite(tensor).all():
            return record(checks, "2 tensors", False, f"{name} holds NaN or Inf")
        if not is_trained or name in frozen:
            if not torch.equal(tensor, base.to(torch_dtype)):
                what = "frozen in the run" if name in frozen else "not trained by the run"
                error = (tensor.float() - base).abs().max().item()
                return record(
                    checks, "2 tensors", False, f"{name} was {what} but differs from the base by {error:.3g}"
                )
            untouched += 1
            continue
        trained += 1
        error = (tensor.float() - expected).abs()
        bound = rtol * expected.abs() + FP32_SUM_RTOL * size + 1e-30
        ratio = (error / bound).max().item()
        if worst_name is None or ratio > worst:
            worst, worst_name = ratio, name
        if ratio > 1:
            index = int((error / bound).argmax())
            where = _index_in(tensor.shape, index)
            return record(
                checks,
                "2 tensors",
                False,
                f"{name}{where} = {tensor.flatten()[index].item():.6g}, but base + scale * B_e A_e = "
                f"{expected.flatten()[index].item():.6g} (error {error.flatten()[index].item():.3g}, "
                f"{ratio:.3g} x the rounding bound)",
            )
    expected_names = set(base_state) - ({"lm_head.weight"} if tied else set())
    missing = sorted(expected_names - written)
    if missing:
        return record(
            checks, "2 tensors", False, f"{len(missing)} tensors of the base are missing ({missing[0]})"
        )
    return record(
        checks,
        "2 tensors",
        True,
        tensors=len(written),
        trained=trained,
        untouched_bit_identical=untouched,
        frozen_bit_identical=len(frozen & written),
        worst_error_in_rounding_bounds=worst,
        worst_tensor=worst_name,
        tensor_rtol=rtol,
        fp32_sum_rtol=FP32_SUM_RTOL,
    )


def _index_in(shape, index: int) -> str:
    if len(shape) == 3:  # an expert stack: name the expert
        per_expert = shape[1] * shape[2]
        return f"[expert {index // per_expert}]"
    return ""


class _RunTensors:
    """A full run's own saved tensors, by name, read on demand."""

    def __init__(self, path: Path):
        self.where: dict[str, Path] = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                self.where.update({key: file for key in handle.keys()})

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        with safe_open(str(self.where[name]), framework="pt") as handle:
            return handle.get_tensor(name)


def frozen_tensors(source: Source, base_state: dict[str, torch.Tensor]) -> set[str]:
    """Tensors the recipe kept frozen in a full fine-tune (`freeze_router`); adapters: the routers PEFT left alone
    are covered by 'not trained'."""
    if source.is_adapter:
        return set()
    which = source.recipe.get("freeze_router") or "none"
    kinds = {
        "all": ("self_attention.experts.router", "mlp.router"),
        "moa": ("self_attention.experts.router",),
        "moe": ("mlp.router",),
    }.get(which, ())
    return {name for name in base_state if any(f".{kind}.layer.weight" in name for kind in kinds)}


# -- checks 3 and 4: a fresh process -------------------------------------------------------------------------------

FRESH_SCRIPT = Path(__file__).with_name("fresh_check.py")


class FreshProcess:
    """A Python process that cannot import `jetmoe_ft`: `python -I fresh_check.py`, started in an empty folder
    outside the checkout, offline. `check(spec)` sends one export's spec and returns its results; one process can
    check several exports in turn (the test suite shares one)."""

    def __init__(self, threads: int | None = None):
        self.folder = tempfile.mkdtemp(prefix="jetmoe-ft-fresh-")
        env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        self.log = open(Path(self.folder) / "stderr.log", "w+")
        self.threads = threads or torch.get_num_threads()
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(FRESH_SCRIPT)],
            cwd=self.folder,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )

    def check(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Checks 3 and 4 of one staged export; a process that dies is a refusal with its last line."""
        result_path = Path(self.folder) / "result.json"
        result_path.unlink(missing_ok=True)
        spec = {**spec, "result": str(result_path), "threads": self.threads}
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.strip() == "@@done@@":
                return json.loads(result_path.read_text())
        self.log.seek(0)
        last = [line for line in self.log.read().splitlines() if line.strip()][-1:] or ["no output"]
        raise ExportRefused(
            f"export refused: the fresh-process check ended without a result ({last[0][:200]})"
        )

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self.log.close()

    def __enter__(self) -> FreshProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fresh_spec(
    source: Source, staging: Path, dtype: str, probes: list[dict], run_snippets: dict, expected, peft_base
) -> dict[str, Any]:
    """What the fresh process checks in the staged export: its files, the config transformers must read, the
    probe conversations, the tolerances, the snippets to execute and what they must print."""
    config = json.loads((staging / "config.json").read_text())
    spec = {
        "export_dir": str(staging),
        "dtype": dtype,
        "task": source.task,
        "probe": str(staging / "probe.safetensors"),
        "expected_config": {
            k: v for k, v in config.items() if k not in ("transformers_version", "architectures")
        },
        "conversations": [
            {key: probe[key] for key in ("messages", "generation_prompt", "text") if key in probe}
            for probe in probes
        ],
        "tolerances": TOLERANCES[dtype],
        "model_snippet": run_snippets["model"],
        "model_snippet_expected": expected,
        "peft": None,
    }
    if peft_base is not None:
        spec["peft"] = {
            "adapter_dir": str(staging / "adapter"),
            "base": peft_base["name"],
            "base_kwargs": source.head_kwargs(),
        }
        spec["adapter_snippet"] = run_snippets["adapter"]
        spec["adapter_snippet_expected"] = expected
    return spec


def record_fresh(checks: list[dict], result: dict[str, Any], peft: bool) -> None:
    """Checks 3 and 4 from the fresh process's results, in order."""
    if "crashed" in result:
        record(checks, "3 fresh load", False, f"the fresh process crashed: {result['crashed']}")
    load = result["fresh_load"]
    record(checks, "3 fresh load", load.pop("passed"), load.pop("failure", None), **load)
    if peft:
        entry = result.get("peft") or {"passed": False, "failure": "did not run"}
        record(checks, "4 stock peft", entry.pop("passed"), entry.pop("failure", None), **entry)
