"""`jetmoe-ft COMMAND ...`: one entry point for every loop, evaluation and tool.

`jetmoe-ft COMMAND --help` lists a loop's recipe keys by group with their defaults; `jetmoe-ft recipes` lists
the recipes shipped in `recipes/` with their first comment line.
"""

import dataclasses
import sys
from pathlib import Path

from trl import ModelConfig

from .config import AdapterArguments, DataArguments, JetMoeArguments, dataclass_types

COMMANDS = {
    "sft": ("jetmoe_ft.sft", "cli", "supervised fine-tuning from a recipe"),
    "dpo": ("jetmoe_ft.dpo", "cli", "preference alignment (DPO) from a recipe"),
    "kto": ("jetmoe_ft.kto", "cli", "unpaired preference alignment (KTO) from a recipe"),
    "orpo": ("jetmoe_ft.orpo", "cli", "reference-free preference alignment (ORPO; SimPO with method: simpo)"),
    "simpo": ("jetmoe_ft.orpo", "simpo_cli", "reference-free preference alignment (SimPO) from a recipe"),
    "grpo": ("jetmoe_ft.grpo", "cli", "online RL (GRPO) with reward heads and checkable rewards"),
    "cls": ("jetmoe_ft.cls", "cli", "train a classifier or reward model (num_labels: 1) from a recipe"),
    "eval-cls": ("jetmoe_ft.evaluate", "cli", "evaluate a trained classification or reward head"),
    "eval-gen": (
        "jetmoe_ft.eval_gen",
        "cli",
        "a fine-tune's answers, rewards, instructions, routing vs its base",
    ),
    "lm-eval": (
        "jetmoe_ft.lm_eval_model",
        "cli",
        "lm-evaluation-harness with the jetmoe-ft model registered",
    ),
    "chat": ("jetmoe_ft.chat", "main", "generate replies with a trained model"),
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
    module_name, function, _ = COMMANDS[argv[0]]
    try:
        module = __import__(module_name, fromlist=[function])
    except ModuleNotFoundError as error:  # an optional extra (lm-eval) that is not installed; other import
        # errors are bugs and keep their traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return getattr(module, function)(argv[1:])


HELP_GROUPS = (
    ("JetMoE", lambda cls, name: cls is JetMoeArguments),
    ("adapters", lambda cls, name: cls is AdapterArguments or (cls is ModelConfig and _is_peft_field(name))),
    (
        "data",
        lambda cls, name: cls is DataArguments or name.startswith(("dataset_", "max_length", "packing")),
    ),
    ("model", lambda cls, name: cls is ModelConfig),
)


def _is_peft_field(name: str) -> bool:
    return name.startswith(("lora_", "use_peft", "use_rslora", "use_dora", "load_in_", "bnb_"))


def recipe_help(training_cls: type, task_cls: type | None = None) -> str:
    """Every recipe key of a command by group (JetMoE, adapters, data, model, this loop, training), with its
    default and the first sentence of its help."""
    groups: dict[str, list[str]] = {}
    for cls in dataclass_types(training_cls, task_cls):
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            group = "this loop" if cls is task_cls else "training"
            group = next((name for name, member in HELP_GROUPS if member(cls, f.name)), group)
            default = _field_default(f)
            text = " ".join(str(f.metadata.get("help", "")).split()).split(". ")[0].rstrip(".")
            groups.setdefault(group, []).append(f"  {f.name:<34} {default:<14} {text[:90]}")
    order = ["JetMoE", "adapters", "data", "this loop", "model", "training"]
    lines = [
        f"Recipe keys ({training_cls.__name__}{', ' + task_cls.__name__ if task_cls else ''}); "
        "set them in the YAML file or as --key value.",
        "Usage: --config RECIPE.yaml [--key value ...]",
    ]
    for name in order:
        if name in groups:
            lines += ["", f"{name}:", *groups[name]]
    return "\n".join(lines)


def _field_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    value = getattr(value, "value", value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)[:14]


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
