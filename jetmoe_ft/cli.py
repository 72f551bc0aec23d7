"""`jetmoe-ft COMMAND ...`: one entry point for every loop."""

import sys

COMMANDS = {
    "sft": ("jetmoe_ft.sft", "cli", "supervised fine-tuning from a recipe"),
    "dpo": ("jetmoe_ft.dpo", "cli", "preference alignment (DPO) from a recipe"),
    "chat": ("jetmoe_ft.chat", "main", "generate replies with a trained model"),
    "cls": ("jetmoe_ft.cls", "cli", "train a classifier or reward model (num_labels: 1) from a recipe"),
    "eval-cls": ("jetmoe_ft.evaluate", "cli", "evaluate a trained classification or reward head"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
        usage = "usage: jetmoe-ft COMMAND --config RECIPE.yaml [--key value ...]\n\ncommands:\n" + "\n".join(
            lines
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}\n\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0
    module_name, function, _ = COMMANDS[argv[0]]
    module = __import__(module_name, fromlist=[function])
    return getattr(module, function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
