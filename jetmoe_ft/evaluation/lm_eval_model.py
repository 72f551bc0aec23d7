"""lm-evaluation-harness on our JetMoE: the `jetmoe-ft` model type (full directories and adapters).

    jetmoe-ft lm-eval run --model jetmoe-ft --model_args pretrained=DIR --tasks TASK [lm_eval flags]

is the `lm_eval` command with this model registered. lm-eval 0.4.13 (the pinned release) has no plugin
discovery: a third-party model is known only once its module is imported, so the bare `lm_eval` command cannot
find it (upstream issues #1621, #3282; the entry-point plugin mechanism was merged after 0.4.13). `import
jetmoe_ft.evaluation.lm_eval_model` registers it for `lm_eval.simple_evaluate` too. `DIR` is anything a training run
wrote: an adapter loads on its base and is merged. `jetmoe-ft eval-gen --lm_eval_tasks` runs tasks on the
fine-tuned model and its baseline. Needs the `eval` extra (`pip install -e ".[eval]"`).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import RecipeError

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # the optional `eval` extra
    raise ModuleNotFoundError(
        'lm-evaluation-harness is not installed: pip install -e ".[eval]"', name="lm_eval"
    ) from error

from ..loading import load_tokenizer_named, load_trained_model, resolve_pad_token
from ..modeling import JetMoeForCausalLM


@register_model("jetmoe-ft", "jetmoe_ft")
class JetMoeLM(HFLM):
    """lm-eval's Hugging Face LM around our JetMoE: log-likelihood, rolling log-likelihood and generation.

    `pretrained` is a directory from a training run (full or adapter, merged on load) or a loaded model; then
    `tokenizer` (an object or a name) is needed. Other arguments are `HFLM`'s (`batch_size`, `max_length`, ...).
    """

    def __init__(
        self, pretrained: str | Path | torch.nn.Module, tokenizer=None, device: str | None = None, **kwargs
    ):
        if isinstance(pretrained, str | Path):
            model = load_trained_model(pretrained, JetMoeForCausalLM, merge=True)
            tokenizer = tokenizer or str(pretrained)
        else:
            model = pretrained.get_base_model() if hasattr(pretrained, "get_base_model") else pretrained
            if tokenizer is None:
                raise RecipeError("lm-eval: a loaded model needs its tokenizer (tokenizer=...).")
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer_named(tokenizer, field="tokenizer")
        resolve_pad_token(tokenizer)
        if device is not None or next(model.parameters()).device.type == "cpu":
            model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        for name in ("dtype", "trust_remote_code", "parallelize", "peft", "revision"):
            kwargs.pop(name, None)  # a loaded model ignores them; say nothing instead of warning
        super().__init__(pretrained=model.eval(), tokenizer=tokenizer, backend="causal", **kwargs)


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(include_path: str | None = None, names: tuple[str, ...] = ()):
    """lm-eval's task index: the local folder alone when it holds every task named (scanning lm-eval's own
    thousands of task files takes tens of seconds), else both; built once per process."""
    if include_path is not None and names:
        local = _manager(include_path, False)
        if set(names) <= set(local.all_tasks):
            return local
    return _manager(include_path, True)


def check_tasks(names: list[str], include_path: str | None = None) -> list[str]:
    """The task names, each known to lm-eval (its own or under `include_path`); an unknown one is one line."""
    names = [name.strip() for name in names if name.strip()]
    if include_path is not None and not Path(include_path).is_dir():
        raise RecipeError(f"--lm_eval_include_path: no such folder {include_path}.")
    known = set(task_manager(include_path, tuple(names)).all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise RecipeError(
            f"--lm_eval_tasks: unknown lm-eval task {', '.join(unknown) or '(none given)'}; "
            "`lm_eval ls tasks` lists them, --lm_eval_include_path adds a folder of local task YAMLs."
        )
    return names


def run_tasks(model, tokenizer, tasks: list[str], args: Any) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` of lm-eval's `simple_evaluate` on a loaded model."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=JetMoeLM(model, tokenizer=tokenizer, batch_size=getattr(args, "batch_size", 8)),
        tasks=tasks,
        task_manager=task_manager(getattr(args, "lm_eval_include_path", None), tuple(tasks)),
        limit=getattr(args, "lm_eval_limit", None),
        log_samples=False,
        random_seed=getattr(args, "seed", 0),
        numpy_random_seed=getattr(args, "seed", 0),
        torch_random_seed=getattr(args, "seed", 0),
    )
    return {
        task: {key: float(value) for key, value in metrics.items() if isinstance(value, int | float)}
        for task, metrics in results["results"].items()
    }


def cli(argv: list[str] | None = None) -> int:
    """`jetmoe-ft lm-eval ...`: lm-eval's own command line (`run`, `ls`, `validate`), `jetmoe-ft` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["jetmoe-ft lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
