"""`jetmoe-ft COMMAND ...`: one entry point for every loop, evaluation and tool.

`jetmoe-ft COMMAND --help` lists a loop's recipe keys by group with their defaults; `jetmoe-ft recipes` lists
the recipes shipped in `recipes/` with their first comment line.
"""

import sys
from pathlib import Path

from .errors import RecipeError
from .recipe_values import value_before_parsing

COMMANDS = {
    "sft": ("jetmoe_ft.sft", "cli", "supervised fine-tuning from a recipe"),
    "dpo": ("jetmoe_ft.dpo", "cli", "preference alignment (DPO) from a recipe"),
    "kto": ("jetmoe_ft.kto", "cli", "unpaired preference alignment (KTO) from a recipe"),
    "orpo": ("jetmoe_ft.orpo", "cli", "reference-free preference alignment (ORPO; SimPO with method: simpo)"),
    "simpo": ("jetmoe_ft.orpo", "simpo_cli", "reference-free preference alignment (SimPO) from a recipe"),
    "grpo": ("jetmoe_ft.grpo", "cli", "online RL (GRPO) with reward heads and checkable rewards"),
    "cls": ("jetmoe_ft.cls", "cli", "train a classifier from a recipe (num_labels: 1 runs `rm`)"),
    "rm": ("jetmoe_ft.rm", "cli", "train a reward model (Bradley-Terry on chosen / rejected pairs)"),
    "eval-cls": ("jetmoe_ft.evaluation.eval_cls", "cli", "evaluate a trained classification or reward head"),
    "eval-gen": (
        "jetmoe_ft.evaluation.eval_gen",
        "cli",
        "a fine-tune's answers, rewards, instructions, routing vs its base",
    ),
    "lm-eval": (
        "jetmoe_ft.evaluation.lm_eval_model",
        "cli",
        "lm-evaluation-harness with the jetmoe-ft model registered",
    ),
    "chat": ("jetmoe_ft.evaluation.chat", "main", "generate replies with a trained model"),
    "export": ("jetmoe_ft.export.command", "cli", "a verified transformers checkpoint (and stock PEFT adapter) of a run"),
    "recipes": ("jetmoe_ft.cli", "list_recipes", "list the shipped recipes with what each one does"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch `jetmoe-ft COMMAND ...`; an unknown command is one line and the command list (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
        usage = (
            "usage: jetmoe-ft COMMAND --config RECIPE.yaml [--key value ...]\n"
            "       jetmoe-ft COMMAND --help   (the recipe keys of a loop, by group, with defaults)\n\n"
            "commands:\n" + "\n".join(lines)
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}\n\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0
    command = "rm" if argv[0] == "cls" and _asks_for_reward_model(argv[1:]) else argv[0]
    module_name, function, _ = COMMANDS[command]
    try:
        module = __import__(module_name, fromlist=[function])
    except ModuleNotFoundError as error:  # an optional extra (lm-eval) that is not installed; other import
        # errors are bugs and keep their traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return getattr(module, function)(argv[1:])


def _asks_for_reward_model(argv: list[str]) -> bool:
    """`jetmoe-ft cls` with `num_labels: 1` trains a reward model, as it always has; an unreadable recipe is left
    to the loop to report."""
    try:
        return str(value_before_parsing(argv, "num_labels")).strip() == "1"
    except RecipeError:
        return False


def recipes_dir() -> Path:
    """`recipes/` of the checkout this package runs from, else of the current directory."""
    beside_package = Path(__file__).resolve().parents[1] / "recipes"
    return beside_package if beside_package.is_dir() else Path.cwd() / "recipes"


def list_recipes(argv: list[str] | None = None) -> int:
    """Print every recipe under `recipes/` with its first comment line (like torchtune's `tune ls`)."""
    root = recipes_dir()
    paths = sorted(root.rglob("*.yaml"))
    if not paths:
        print(f"error: no recipes under {root}; run from the jetmoe-ft checkout.", file=sys.stderr)
        return 2
    width = max(len(str(path.relative_to(root.parent))) for path in paths)
    for path in paths:
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        print(f"{str(path.relative_to(root.parent)):<{width}}  {first.lstrip('# ').strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
