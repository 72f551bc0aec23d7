"""`jetmoe-ft export --model RUN_DIR --output DIR [--dtype bf16|fp32] [--peft_adapter] [--base DIR_OR_ID]
[--push_to_hub REPO_ID] [--max_shard_size 5GB]`.

Exit status: 0 exported (and pushed), 2 a mistake in the input (one line), 5 a check refused the export (one line
naming the check and its figure; nothing written to DIR, nothing uploaded).
"""

from __future__ import annotations

import argparse
import sys

from ..config import RecipeError
from ..training.runs import run_command
from .checks import ExportRefused
from .pipeline import export_run

REFUSED_EXIT = 5


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        raise RecipeError(f"{message}; see `jetmoe-ft export --help`.")


def parser() -> argparse.ArgumentParser:
    """The command line of `jetmoe-ft export`."""
    p = _Parser(prog="jetmoe-ft export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the run's output_dir (a model or an adapter)")
    p.add_argument("--output", required=True, help="a new (or empty) directory for the export")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default: the dtype the run trained in")
    p.add_argument(
        "--peft_adapter", action="store_true", help="also write DIR/adapter in stock PEFT's format"
    )
    p.add_argument("--base", help="with --peft_adapter: the base model directory or hub id the adapter names")
    p.add_argument("--push_to_hub", metavar="REPO_ID", help="upload DIR to the Hub after every check passed")
    p.add_argument("--max_shard_size", default="5GB", help="safetensors shard size (default 5GB)")
    return p


def main(argv: list[str] | None = None):
    """Parse `argv` and export."""
    args = parser().parse_args(argv)
    return export_run(
        args.model,
        args.output,
        dtype=args.dtype,
        peft_adapter=args.peft_adapter,
        base=args.base,
        push_to_hub=args.push_to_hub,
        max_shard_size=args.max_shard_size,
    )


def cli(argv: list[str] | None = None) -> int:
    """`jetmoe-ft export`: a refused export is one line and exit status 5; input mistakes exit 2."""
    try:
        return run_command(main, argv)
    except ExportRefused as refused:
        print(f"error: {refused}", file=sys.stderr)
        return REFUSED_EXIT


if __name__ == "__main__":
    sys.exit(cli())
