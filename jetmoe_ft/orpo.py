"""Reference-free preference alignment of JetMoE from a YAML recipe: ORPO (TRL's `ORPOTrainer`) or SimPO (TRL's
`CPOTrainer` with `loss_type: simpo`), both from `trl.experimental`.

jetmoe-ft orpo --config recipes/tiny/orpo.yaml [--key value ...]
jetmoe-ft simpo --config recipes/tiny/simpo.yaml           (the same loop; `method: simpo` is its default)
accelerate launch -m jetmoe_ft.orpo --config recipes/tiny/orpo.yaml

The recipe names the method (`method: orpo | simpo`). Neither has a reference model: one copy of the weights,
one stage (ORPO adds the chosen answer's language-model loss to its odds-ratio term, so it can start from a base
model). Before and after training, the held-out pairwise accuracy of the method's implicit reward, beta x the
average log-probability of an answer, compares the chosen and rejected answer of each held-out pair
(`eval_{before,after}_pairs/*` in `metrics.json`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from .adapters.adapt import adapt_model
from .compat import trl_stored_metrics
from .config import RecipeError, parse_recipe, recipe_key
from .data import check_preferences, load_recipe_datasets
from .distributed import is_main_process
from .evaluation.preference_report import pair_metrics, preference_lines
from .loading import (
    check_recipe_model,
    check_tokenizer,
    load_recipe_model,
    load_recipe_tokenizer,
    resolve_pad_token,
)
from .recipe_values import value_before_parsing
from .training.reference import record_stacked_base
from .training.runs import (
    finish_run,
    make_trainer,
    memory_metrics,
    prepare_processes,
    run_command,
    start_run,
    train_with_evaluations,
)
from .training.trainers import JetMoeTrainerMixin

METHODS = ("orpo", "simpo")
REFERENCE_FREE = {
    "orpo": "ORPO: no reference model (reference-free: odds-ratio term + the chosen answer's LM loss); "
    "one copy of the weights.",
    "simpo": "SimPO: no reference model (reference-free: margin of average log-probabilities); "
    "one copy of the weights.",
}


@dataclass
class MethodArguments:
    """The recipe key that picks the loss of this loop."""

    method: str = recipe_key(
        "orpo", "orpo (TRL ORPOTrainer) or simpo (TRL CPOTrainer, loss_type simpo).", choices=METHODS
    )


class HeldOutPairs:
    """Held-out pairwise accuracy of the average log-probability margin in `evaluate`, and TRL's stored
    evaluation metrics (always named `eval_*`) filed under the evaluation's prefix."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is None and self.eval_dataset is not None:
            metrics.update(pair_metrics(self.held_out_margins(), metric_key_prefix))
        return metrics

    def held_out_margins(self) -> torch.Tensor:
        """beta x (average log-probability of the chosen answer - of the rejected one), per held-out pair, from
        the trainer's own forward; TRL's rewards on the same scale."""
        model = self.model
        training = model.training
        model.eval()
        margins = []
        with torch.no_grad():
            for batch in self.get_eval_dataloader():
                chosen, rejected = self.concatenated_forward(model, batch)[:2]
                margins.append(self.accelerator.gather_for_metrics(self.beta * (chosen - rejected).float()))
        model.train(training)
        return torch.cat(margins).cpu()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = getattr(self, "_metric_key_prefix", "eval")
        stored = trl_stored_metrics(self)
        if stored is not None and not self.model.training and prefix != "eval" and stored.get("eval"):
            for key, values in stored.pop("eval").items():
                logs[f"{prefix}_{key.removeprefix('eval_')}"] = sum(values) / len(values)
        super().log(logs, start_time)


class JetMoeORPOTrainer(HeldOutPairs, JetMoeTrainerMixin, ORPOTrainer):
    """TRL's experimental `ORPOTrainer` with the JetMoE trainer layer (router loss once, its logs, routing health)."""


class JetMoeSimPOTrainer(HeldOutPairs, JetMoeTrainerMixin, CPOTrainer):
    """TRL's experimental `CPOTrainer` (`loss_type: simpo`) with the JetMoE trainer layer."""


TRAINERS = {"orpo": (ORPOConfig, JetMoeORPOTrainer), "simpo": (CPOConfig, JetMoeSimPOTrainer)}


def recipe_method(argv: list[str], default: str = "orpo") -> str:
    """`method` from `--method`, else the recipe file, else `default`; read before parsing, because the method
    decides the training arguments class."""
    value = value_before_parsing(argv, "method", default)
    if value not in METHODS:
        raise RecipeError(f"method: {value!r} is not one of {', '.join(METHODS)}.")
    return value


def parse_method_recipe(argv: list[str] | None, default: str):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        return parse_recipe(TRAINERS[default][0], argv, task_cls=MethodArguments)
    method = recipe_method(argv, default)
    recipe = parse_recipe(TRAINERS[method][0], argv, task_cls=MethodArguments)
    recipe.task.method = recipe.values["method"] = method  # the saved recipe names it too
    args = recipe.training
    if method == "simpo":
        if recipe.values.get("loss_type", "simpo") != "simpo":
            raise RecipeError(
                f"loss_type: {recipe.values['loss_type']!r} with method simpo; drop it (SimPO is loss_type simpo) "
                "or run another method."
            )
        args.loss_type = "simpo"
    return recipe


def main(argv: list[str] | None = None, default_method: str = "orpo") -> dict[str, float]:
    """Run one ORPO or SimPO recipe; returns the final metrics."""
    prepare_processes()
    recipe = parse_method_recipe(argv, default_method)
    check_recipe_model(recipe)  # against the model's config.json, before data or weights load
    method, args = recipe.task.method, recipe.training
    if is_main_process():
        print(REFERENCE_FREE[method])

    data = load_recipe_datasets(recipe.data, method, seed=args.seed)
    tokenizer = load_recipe_tokenizer(recipe)
    resolve_pad_token(tokenizer)  # its own, else eos, else unk (KTO / ORPO configs have no `pad_token`)
    check_tokenizer(tokenizer, data["train"], args.max_length)
    # TRL truncates the answer, never the prompt: a prompt of max_length tokens leaves no answer to score.
    pair_args = SimpleNamespace(
        max_length=args.max_length, truncation_mode="keep_start", dataset_num_proc=args.dataset_num_proc
    )
    data = check_preferences(data, tokenizer, pair_args)
    run = start_run(recipe, data)
    model = load_recipe_model(recipe)
    model = adapt_model(recipe, model, train_dataset=data["train"], tokenizer=tokenizer)
    record_stacked_base(model, recipe)

    trainer = make_trainer(TRAINERS[method][1], recipe, model, data, tokenizer)
    metrics = train_with_evaluations(trainer, run)
    metrics |= {"method": method, "reference": "none", **memory_metrics(trainer)}
    what = (
        f"pairwise accuracy of the average log-probability ({metrics.get('eval_after_pairs/count', 0)} pairs)"
    )
    lines = preference_lines(metrics, "pairs/accuracy", "pairs/margin", "pairs/accuracy_se", what)
    finish_run(trainer, recipe, tokenizer, metrics, lines)
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """`python -m jetmoe_ft.orpo`: user mistakes are one line on stderr, not a traceback."""
    return run_command(main, argv)


def simpo_cli(argv: list[str] | None = None) -> int:
    """`jetmoe-ft simpo`: the same loop with `method: simpo` as the default."""
    return run_command(lambda args: main(args, default_method="simpo"), argv)


if __name__ == "__main__":
    sys.exit(cli())
