"""Checks 3 and 4 of `jetmoe-ft export`, run as a script in a fresh Python process that cannot import `jetmoe_ft`.

Started by `jetmoe_ft.export.checks.FreshProcess` as `python -I fresh_check.py` from a folder outside the checkout,
offline. Every line on stdin is one JSON spec (an export to check); the results go to the JSON file the spec names,
then `@@done@@` is printed. This file imports only the standard library, torch, safetensors, transformers and peft:
what a user of the export has.

- check 3: transformers' own classes load the export with no missing, unexpected or mismatched tensors, the config
  is transformers' `JetMoeConfig` with the same meaning, the chat template gives the same token ids, the logits
  match the run's own model (probe.safetensors), greedy tokens are identical, every router picks the same top-k
  experts, and the model card's usage snippet prints what the run's own model generates;
- check 4: stock PEFT on transformers' model loads `adapter/`, reproduces the same logits, and its
  `merge_and_unload()` equals the exported tensors.
"""

import contextlib
import importlib.abc
import io
import json
import math
import sys
import traceback


class _BlockJetMoeFt(importlib.abc.MetaPathFinder):
    """Makes `import jetmoe_ft` fail here, even when the package is installed (editable or not)."""

    def find_spec(self, name, path=None, target=None):
        if name == "jetmoe_ft" or name.startswith("jetmoe_ft."):
            raise ImportError(f"{name} is blocked in the fresh-process export check")
        return None


sys.meta_path.insert(0, _BlockJetMoeFt())

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

DONE = "@@done@@"


class CheckFailed(Exception):
    """One check's failure: the message names the figure."""


def jetmoe_ft_importable() -> bool:
    try:
        import jetmoe_ft  # noqa: F401
    except ImportError:
        return False
    return True


def probes(path: str) -> list[dict]:
    """The probe rows of `probe.safetensors`: input ids, reference logits, greedy tokens, router top-k."""
    tensors = load_file(path)
    count = int(tensors["count"].item())
    rows = []
    for index in range(count):
        row = {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith(f"{index}/")}
        rows.append(row)
    return rows


def model_class(task: str):
    return (
        transformers.AutoModelForSequenceClassification
        if task == "sequence_classification"
        else transformers.AutoModelForCausalLM
    )


def compare_logits(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Max absolute error and mean KL(reference || logits) over positions, in float64."""
    error = (logits.double() - reference.double()).abs().max().item()
    log_p = torch.log_softmax(reference.double(), -1)
    log_q = torch.log_softmax(logits.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return error, max(kl, 0.0)


def logits_verdict(name: str, figures: dict, tolerances: dict, dtype: str) -> None:
    """fp32: max error within `logits_atol`; bf16: KL within `kl_max` (max error reported)."""
    if dtype == "float32" and not figures["max_abs_error"] <= tolerances["logits_atol"]:
        raise CheckFailed(
            f"{name}: logits differ from the run's own model by {figures['max_abs_error']:.3g} (tolerance "
            f"{tolerances['logits_atol']:g} in fp32)"
        )
    if not figures["mean_kl"] <= tolerances["kl_max"]:
        raise CheckFailed(
            f"{name}: KL from the run's own model {figures['mean_kl']:.3g} (tolerance {tolerances['kl_max']:g})"
        )


def run_probes(model, rows: list[dict], task: str, generate: bool) -> dict:
    """Logits, greedy tokens and router agreement of `model` on every probe row.

    Greedy tokens are compared teacher-forced on the run's own greedy continuation: at each generated position the
    model's argmax must be the run's token, unless the run's own top-2 margin there is within twice the logit error
    (a tie that rounding decides; counted and reported)."""
    errors, kls, agreements = [], [], None
    greedy = {"positions": 0, "ties": 0, "first_difference": None}
    for index, row in enumerate(rows):
        with torch.no_grad():
            output = model(input_ids=row["input_ids"][None])
        logits = output.logits[0] if task != "sequence_classification" else output.logits
        error, kl = compare_logits(logits.float().reshape(row["logits"].shape), row["logits"])
        errors.append(error)
        kls.append(kl)
        with torch.no_grad():
            # transformers' classification head returns no router logits: its backbone does
            routed = (model if generate else backbone(model))(
                input_ids=row["routed_ids"][None], output_router_logits=True
            )
        if generate:
            compare_greedy(routed.logits[0].float(), row, greedy, index)
        agreement = router_agreement(routed.router_logits, row)
        agreements = (
            agreement
            if agreements is None
            else [(a[0] + b[0], a[1] + b[1]) for a, b in zip(agreements, agreement, strict=True)]
        )
    figures = {"max_abs_error": max(errors), "mean_kl": sum(kls) / len(kls)}
    if generate:
        figures["greedy_identical"] = greedy["first_difference"] is None
        figures["greedy_positions"] = greedy["positions"]
        figures["greedy_ties_within_error"] = greedy["ties"]
        figures["greedy_first_difference"] = greedy["first_difference"]
    shares = [same / total for same, total in agreements]
    figures["router_topk_agreement_min"] = min(shares)
    figures["routers"] = len(shares)
    return figures


def backbone(model):
    """The `JetMoeModel` inside transformers' model (or inside PEFT's wrapper of it)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model


def compare_greedy(logits: torch.Tensor, row: dict, greedy: dict, index: int) -> None:
    """Count the greedy positions of one probe (see `run_probes`) into `greedy`."""
    reference = row["routed_logits"]
    error = (logits - reference).abs().max().item()
    start = row["input_ids"].numel() - 1
    tokens = row["routed_ids"][start + 1 :]
    top2 = reference[start : start + tokens.numel()].topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    chosen = logits[start : start + tokens.numel()].argmax(-1)
    for position, (token, pick, margin) in enumerate(
        zip(tokens.tolist(), chosen.tolist(), margins.tolist(), strict=True)
    ):
        greedy["positions"] += 1
        if token == pick:
            continue
        if margin <= 2 * error:
            greedy["ties"] += 1
        elif greedy["first_difference"] is None:
            greedy["first_difference"] = (
                f"probe {index} token {position}: {pick} instead of {token} (margin {margin:.3g}, error {error:.3g})"
            )


def router_agreement(router_logits, row: dict) -> list[tuple[int, int]]:
    """(same, total) top-k sets per router on the probe's tokens. A token whose top-k differs counts as the same
    when the run's own margin between its k-th and (k+1)-th expert is within twice this router's logit error: a
    tie that rounding decides (bf16), not another routing."""
    reference, reference_logits = (
        row["topk"],
        row["router_logits"],
    )  # [routers, tokens, k], [routers, tokens, E]
    k = reference.shape[-1]
    result = []
    for router, logits in enumerate(router_logits):
        logits = logits.float()
        chosen = logits.topk(k, dim=-1).indices.sort(-1).values
        same = (chosen == reference[router].sort(-1).values).all(-1)
        ours = reference_logits[router]
        error = (logits - ours).abs().max().item()
        if k < ours.shape[-1]:
            top = ours.topk(k + 1, dim=-1).values
            tie = (top[:, k - 1] - top[:, k]) <= 2 * error
            same = same | tie
        result.append((int(same.sum()), int(same.numel())))
    return result


def check_config(export_dir: str, expected: dict) -> dict:
    """The config is transformers' own `JetMoeConfig` and reads every field as the run meant it."""
    config = transformers.AutoConfig.from_pretrained(export_dir)
    if type(config) is not transformers.JetMoeConfig:
        raise CheckFailed(f"config: transformers reads {type(config).__name__}, not JetMoeConfig")
    with open(f"{export_dir}/config.json") as handle:
        written = json.load(handle)
    known = set(transformers.JetMoeConfig().to_dict()) | set(transformers.PreTrainedConfig().to_dict())
    unknown = sorted(set(written) - known)
    if unknown:
        raise CheckFailed(f"config: fields transformers' JetMoeConfig does not know: {', '.join(unknown)}")
    different = [
        f"{key}={getattr(config, key, None)!r} (expected {value!r})"
        for key, value in expected.items()
        if _normal(getattr(config, key, None)) != _normal(value)
    ]
    if different:
        raise CheckFailed(f"config: transformers reads {', '.join(different[:3])}")
    return {
        "config_class": f"{type(config).__module__}.{type(config).__name__}",
        "fields_compared": len(expected),
    }


def _normal(value):
    if isinstance(value, dict):
        return {str(key): _normal(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_normal(item) for item in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


def load_export(export_dir: str, task: str, dtype: torch.dtype):
    """transformers' own class loads the export with no missing, unexpected or mismatched tensors."""
    model, info = model_class(task).from_pretrained(export_dir, dtype=dtype, output_loading_info=True)
    problems = {
        kind: sorted(str(key) for key in info.get(kind, []))
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        kind, keys = next(iter(problems.items()))
        raise CheckFailed(f"load: {len(keys)} {kind.replace('_', ' ')} ({', '.join(keys[:3])})")
    if not type(model).__module__.startswith("transformers.models.jetmoe"):
        raise CheckFailed(f"load: {type(model).__module__} is not transformers' JetMoe")
    return model.eval()


def check_template(export_dir: str, rows: list[dict], conversations: list) -> dict:
    """The exported tokenizer and chat template give the probe's token ids."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    for index, (row, probe) in enumerate(zip(rows, conversations, strict=True)):
        if "messages" not in probe:
            ids = tokenizer(probe["text"])["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(
                probe["messages"],
                add_generation_prompt=probe["generation_prompt"],
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        if list(ids) != row["input_ids"].tolist():
            raise CheckFailed(
                f"chat template: probe {index} tokenizes to other ids ({len(ids)} tokens vs "
                f"{row['input_ids'].numel()})"
            )
    return {"template_ids_identical": True, "probes": len(rows)}


def run_snippet(snippet: str) -> str:
    """The model card's usage snippet, executed; what it prints."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "<model card snippet>", "exec"), {"__name__": "__snippet__"})
    return printed.getvalue().strip()


def check_snippet(spec: dict, name: str) -> dict:
    """The card's snippet `name` prints what the run's own model gives (bf16 generation: reported)."""
    snippet = spec.get(f"{name}_snippet")
    if not snippet:
        return {}
    printed = run_snippet(snippet)
    expected = spec[f"{name}_snippet_expected"]
    if spec["dtype"] != "float32" and not isinstance(
        expected, float
    ):  # bf16 generation: ties may flip; reported
        return {"snippet_output_identical": printed == expected}
    if isinstance(expected, float):
        same = math.isclose(float(printed), expected, rel_tol=0, abs_tol=spec["tolerances"]["score_atol"])
    else:
        same = printed == expected
    if not same:
        raise CheckFailed(f"{name} snippet: printed {printed[:80]!r}, the run's own model gives {expected!r}")
    return {"snippet_output_identical": True}


def check_export(spec: dict) -> tuple[dict, object]:
    """Check 3; returns its figures and the loaded model (check 4 compares against its tensors)."""
    figures = {"jetmoe_ft_importable": jetmoe_ft_importable()}
    if figures["jetmoe_ft_importable"]:
        raise CheckFailed("isolation: jetmoe_ft is importable in the fresh process")
    dtype = getattr(torch, spec["dtype"])
    rows = probes(spec["probe"])
    figures.update(check_config(spec["export_dir"], spec["expected_config"]))
    model = load_export(spec["export_dir"], spec["task"], dtype)
    stored = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    if stored != {spec["dtype"]}:
        raise CheckFailed(f"load: parameters in {sorted(stored)}, not {spec['dtype']}")
    figures["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
    figures.update(check_template(spec["export_dir"], rows, spec["conversations"]))
    figures.update(run_probes(model, rows, spec["task"], generate=spec["task"] != "sequence_classification"))
    verdicts(figures, spec, "logits")
    figures.update(check_snippet(spec, "model"))
    return figures, model


def verdicts(figures: dict, spec: dict, name: str) -> None:
    """Logits, then greedy tokens and router top-k against the tolerances."""
    logits_verdict(name, figures, spec["tolerances"], spec["dtype"])
    if name == "peft logits" and not spec["tolerances"]["peft_token_gates"]:
        return  # bf16: PEFT adds the delta in bf16 on every forward, a second rounding: greedy / top-k reported only
    if figures.get("greedy_identical") is False:
        raise CheckFailed(f"{name}: greedy tokens differ ({figures['greedy_first_difference']})")
    minimum = spec["tolerances"]["router_agreement_min"]
    if "router_topk_agreement_min" in figures and figures["router_topk_agreement_min"] < minimum:
        raise CheckFailed(
            f"{name}: a router picks other top-k experts on {1 - figures['router_topk_agreement_min']:.2%} of probe "
            f"tokens (at most {1 - minimum:.1%} allowed)"
        )


def check_peft(spec: dict, exported) -> dict:
    """Check 4: stock PEFT on transformers' model, the adapter in `adapter/`."""
    from peft import PeftModel, get_peft_model_state_dict

    peft_spec = spec["peft"]
    dtype = getattr(torch, spec["dtype"])
    rows = probes(spec["probe"])

    def load(load_dtype):
        base = model_class(spec["task"]).from_pretrained(
            peft_spec["base"], dtype=load_dtype, **peft_spec["base_kwargs"]
        )
        return PeftModel.from_pretrained(base, peft_spec["adapter_dir"]).eval()

    model = load(dtype)
    loaded = get_peft_model_state_dict(model)
    saved = load_file(f"{peft_spec['adapter_dir']}/adapter_model.safetensors")
    wrong = [  # modules_to_save copies live in the base's dtype, LoRA factors in theirs
        key
        for key, value in saved.items()
        if key not in loaded or not torch.equal(loaded[key].cpu(), value.to(loaded[key].dtype))
    ]
    if wrong or len(loaded) != len(saved):
        raise CheckFailed(
            f"peft load: {len(wrong)} adapter tensors not loaded as saved ({', '.join(wrong[:3])})"
        )
    figures = {
        "adapter_tensors_loaded": len(saved),
        "peft_model_class": type(model.get_base_model()).__module__,
    }
    figures.update(run_probes(model, rows, spec["task"], generate=spec["task"] != "sequence_classification"))
    verdicts(figures, spec, "peft logits")
    if spec["tolerances"]["peft_token_gates"]:
        figures.update(check_snippet(spec, "adapter"))
    # merge_and_unload in fp32 (PEFT merges in the base's dtype), rounded once to the export's dtype: equal to the
    # exported tensors up to that one rounding
    merged = (model if dtype == torch.float32 else load(torch.float32)).merge_and_unload().state_dict()
    ours = exported.state_dict()
    worst, differing, total = 0.0, 0, 0
    for key, value in ours.items():
        if key not in merged:
            raise CheckFailed(f"peft merge_and_unload: no tensor {key}")
        theirs = merged[key].to(value.dtype).float()
        value = value.float()
        difference = (theirs - value).abs()
        scale = value.abs().max().clamp_min(1e-30)
        bound = (
            spec["tolerances"]["merge_rtol"] * value.abs() + spec["tolerances"]["merge_atol_of_max"] * scale
        )
        worst = max(worst, (difference / bound.clamp_min(1e-30)).max().item())
        differing += int((difference > 0).sum())
        total += value.numel()
        if bool((difference > bound).any()):
            raise CheckFailed(
                f"peft merge_and_unload: {key} differs from the export by {difference.max().item():.3g} "
                f"(tolerance {spec['tolerances']['merge_rtol']:g} relative)"
            )
    figures.update(
        merge_max_error_in_tolerances=worst, merge_elements_differing=differing, merge_elements=total
    )
    return figures


def handle(spec: dict) -> dict:
    """Check 3, then (with an adapter) check 4; a crash inside a check fails that check with its last line."""
    result = {}
    try:
        figures, model = check_export(spec)
        result["fresh_load"] = {"passed": True, **figures}
    except Exception as error:
        result["fresh_load"] = {"passed": False, "failure": failure_line(error)}
        return result
    if spec.get("peft"):
        try:
            result["peft"] = {"passed": True, **check_peft(spec, model)}
        except Exception as error:
            result["peft"] = {"passed": False, "failure": failure_line(error)}
    return result


def failure_line(error: Exception) -> str:
    """One line for a failed check; a crash names its place."""
    if isinstance(error, CheckFailed):
        return str(error)
    frame = traceback.extract_tb(error.__traceback__)[-1]
    message = str(error).splitlines()[0] if str(error) else ""
    return f"crashed: {type(error).__name__}: {message} (at {frame.filename}:{frame.lineno} in {frame.name})"


def main() -> None:
    torch.manual_seed(0)
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
        try:
            result = handle(spec)
        except Exception as error:  # outside any check (a bad spec): still one line back
            result = {"crashed": failure_line(error)}
        with open(spec["result"], "w") as handle_:
            json.dump(result, handle_, indent=1, default=str)
        print(DONE, flush=True)


if __name__ == "__main__":
    main()
