"""Recipes: one flat YAML file per run, parsed with TRL's `TrlParser` into dataclasses.
(About 450 lines because each group of recipe fields keeps its own checks beside its fields, and the help
that lists them by group lives with them.)

Keys are TRL/transformers argument names (`SFTConfig`, `DPOConfig`, ..., TRL's `ModelConfig`) plus
`DataArguments` and `JetMoeArguments` below. YAML values come first, then `--key value` overrides from
the command line. Every user mistake found here raises `RecipeError`: one line naming the field and
the fix, before any model or data set is loaded.
"""

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from trl import ModelConfig, TrlParser

from .compat import parser_actions
from .errors import RecipeError
from .modeling.configuration_jetmoe import MOE_BACKENDS
from .recipe_values import (
    YamlValue,
    coerce,
    command_line_keys,
    did_you_mean,
    field_types,
    plain,
    read_recipe_file,
)


def recipe_key(default: Any, help: str, **metadata: Any):
    """A recipe field: its default, the one-sentence help `--help` lists, and argparse extras (`choices`)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class JetMoeArguments:
    """JetMoE fields of a recipe. `None` keeps what the model's own config says."""

    tokenizer_name_or_path: str | None = recipe_key(
        None, "Tokenizer to use; defaults to the model's own (the embedded one for the tiny model)."
    )
    model_seed: int = recipe_key(0, "Seed of the random tiny model (`jetmoe-ft/tiny`).")
    moe_backend: str | None = recipe_key(
        None, "Expert dispatch: auto, loop or grouped_mm.", choices=MOE_BACKENDS
    )
    expert_row_multiple: int | None = recipe_key(
        None, "Pad each expert's rows to a multiple of this (null: automatic)."
    )
    aux_loss_coef: float | None = recipe_key(
        None, "Weight of the JetMoE router loss in the training loss; 0 turns it off."
    )
    router_z_loss_coef: float | None = recipe_key(
        None, "Weight of the z-loss inside the router loss (JetMoE: 0.1)."
    )
    router_loss_ignore_padding: bool | None = recipe_key(
        None, "Leave padding tokens out of the router loss statistics."
    )
    chunked_lm_head: bool = recipe_key(
        True,
        "Score tokens with the chunked LM head (no [tokens, vocab] logits kept); false builds the logits.",
    )
    lm_head_chunk_size: int = recipe_key(1024, "Tokens per chunk of the chunked LM head.")
    overwrite_output_dir: bool = recipe_key(
        False, "Start a fresh run in an output_dir that holds another run's checkpoints."
    )
    resume_other_recipe: bool = recipe_key(
        False, "Resume a checkpoint that another recipe (other values or data) wrote."
    )
    allow_partial_load: bool = recipe_key(
        False,
        "Start from a checkpoint that lacks some of the model's tensors or holds extra ones (missing "
        "ones are newly initialised); off, such a checkpoint is refused.",
    )
    nonfinite_skip_steps: int = recipe_key(
        0, "Optimizer steps with a NaN/Inf loss or gradient to skip before stopping (0: stop at the first)."
    )

    def model_config_overrides(self) -> dict[str, Any]:
        """The fields to set on the model config, leaving out those the recipe did not set."""
        names = ("moe_backend", "expert_row_multiple", "aux_loss_coef", "router_z_loss_coef")
        overrides = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.router_loss_ignore_padding is not None:
            overrides["router_loss_ignore_padding"] = self.router_loss_ignore_padding
        return overrides


LORA_TARGETS = ("moa_experts", "moe_experts", "kv_proj", "router", "lm_head", "embed_tokens", "score")
"""Names `lora_targets:` accepts: adapter targets, and heads/embeddings trained whole (`modules_to_save`)."""
FREEZE_ROUTER = ("none", "all", "moa", "moe")
EXPERT_SCORES = ("gate", "token")


@dataclass
class AdapterArguments:
    """What to train: expert-aware LoRA targets, which experts, frozen routers (see `jetmoe_ft.adapters.adapt`)."""

    lora_targets: list[str] | None = recipe_key(
        None, "LoRA targets by name: " + ", ".join(LORA_TARGETS) + ". Setting it turns LoRA on."
    )
    lora_experts: YamlValue = recipe_key(
        "all",
        "Experts that get LoRA: all, auto (picked from the data), a list of expert indices, "
        "or a mapping layer -> list.",
    )
    finetune_experts: YamlValue = recipe_key(
        None,
        "Full fine-tuning of only these experts (others get no update): auto, a list, "
        "or a mapping layer -> list; null trains every expert.",
    )
    expert_score: str = recipe_key(
        "gate",
        "How `auto` scores experts: gate (average gate score) or token (selection ratio).",
        choices=EXPERT_SCORES,
    )
    expert_top_p: float = recipe_key(
        0.5, "`auto` keeps, per router, the fewest experts whose score share reaches this."
    )
    expert_selection_samples: int = recipe_key(
        256, "Training rows the base model reads to score experts for `auto`."
    )
    freeze_router: str | None = recipe_key(
        None,
        "Routers kept frozen: none, all, moa or moe (null: none for full fine-tuning, all with LoRA).",
        choices=FREEZE_ROUTER,
    )

    def frozen_routers(self, use_lora: bool) -> str:
        """`freeze_router` with its default resolved: routers train in full fine-tuning, stay frozen with LoRA."""
        return self.freeze_router or ("all" if use_lora else "none")

    def __post_init__(self):
        for name in self.lora_targets or []:
            if name not in LORA_TARGETS:
                raise RecipeError(
                    f"lora_targets: unknown target `{name}`{did_you_mean(name, LORA_TARGETS)}; "
                    f"valid: {', '.join(LORA_TARGETS)}."
                )
        for key in ("lora_experts", "finetune_experts"):
            _check_expert_choice(key, getattr(self, key))
        if not 0 < self.expert_top_p <= 1:
            raise RecipeError(f"expert_top_p: expected a number in (0, 1], got {self.expert_top_p}.")
        if self.expert_selection_samples < 1:
            raise RecipeError("expert_selection_samples: expected a positive integer.")


def _check_expert_choice(key: str, value: Any) -> None:
    """`all`, `auto`, a list of expert indices, or a mapping layer -> list of expert indices."""
    if value is None or value in ("all", "auto"):
        return
    if isinstance(value, str):
        raise RecipeError(
            f"{key}: expected all, auto, a list of experts or a mapping layer -> list, got {value!r}."
        )
    lists = value.values() if isinstance(value, dict) else [value]
    if isinstance(value, dict) and not all(isinstance(layer, int) and layer >= 0 for layer in value):
        raise RecipeError(f"{key}: mapping keys are layer indices (0, 1, ...), got {list(value)}.")
    for experts in lists:
        if not isinstance(experts, list) or not all(isinstance(e, int) and e >= 0 for e in experts):
            raise RecipeError(f"{key}: expected lists of expert indices (e.g. [0, 3]), got {experts!r}.")


DATASET_ENTRY_KEYS = ("path", "name", "data_dir", "data_files", "split", "columns", "weight")


@dataclass
class DataArguments:
    """Where the data comes from: one source (`dataset_name`) or a mixture (`datasets`)."""

    dataset_name: str | None = recipe_key(
        None, "An embedded data set, a local file or folder (json/jsonl/csv/parquet), or a hub id."
    )
    dataset_config: str | None = recipe_key(None, "Configuration name of the data set.")
    dataset_train_split: str = recipe_key("train", "Split to train on.")
    dataset_test_split: str = recipe_key("test", "Split to evaluate on.")
    datasets: list[dict] | None = recipe_key(
        None, "A mixture: entries with path, name, data_dir, data_files, split, columns, weight."
    )
    test_split_size: float | None = recipe_key(
        None, "Hold out this share of the training data when there is no test split."
    )
    max_train_samples: int | None = recipe_key(None, "Use at most this many training rows.")
    max_eval_samples: int | None = recipe_key(None, "Use at most this many evaluation rows.")

    def __post_init__(self):
        if self.dataset_name is None and not self.datasets:
            raise RecipeError(
                "No data: set `dataset_name:` (e.g. `dataset_name: chatterbot`) or a `datasets:` list."
            )
        if self.dataset_name is not None and self.datasets:
            raise RecipeError("Set either `dataset_name:` or `datasets:`, not both.")
        for index, entry in enumerate(self.datasets or []):
            where = f"datasets[{index}]"
            if not isinstance(entry, dict):
                raise RecipeError(
                    f"{where}: expected a mapping with `path:` (and name, split, ...), got {entry!r}."
                )
            for key in entry:
                if key not in DATASET_ENTRY_KEYS:
                    raise RecipeError(f"{where}: unknown key `{key}`{did_you_mean(key, DATASET_ENTRY_KEYS)}.")
            if "path" not in entry:
                raise RecipeError(
                    f"{where}: `path:` is missing (an embedded name, a local file or a hub id)."
                )
            weight = entry.get("weight")
            if weight is not None and (not isinstance(weight, int | float) or weight <= 0):
                raise RecipeError(f"{where}.weight: expected a positive number, got {weight!r}.")
            same = _source_key(entry)
            for earlier, other in enumerate(self.datasets[:index]):
                if isinstance(other, dict) and _source_key(other) == same:
                    raise RecipeError(
                        f"{where}: the same source as datasets[{earlier}] ({entry['path']}); list it once and use "
                        "`weight:` (e.g. 2) to take its rows twice (its held-out rows would be duplicated too)."
                    )
        if self.test_split_size is not None and not 0 < self.test_split_size < 1:
            raise RecipeError(
                f"test_split_size: expected a number between 0 and 1, got {self.test_split_size}."
            )


def _source_key(entry: dict) -> tuple:
    """What makes two mixture entries the same source (columns and weight aside)."""
    return tuple(str(entry.get(key)) for key in ("path", "name", "data_dir", "data_files", "split"))


@dataclass
class Recipe:
    """A parsed recipe: one dataclass per group of fields, and where it came from."""

    data: DataArguments
    training: Any
    model: ModelConfig
    jetmoe: JetMoeArguments
    adapters: AdapterArguments
    task: Any = None
    """The loop's own fields (a dataclass given to `parse_recipe` as `task_cls`), or None."""
    path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)
    """The recipe's values after the command-line overrides, as written to the output directory."""

    @property
    def uses_lora(self) -> bool:
        """Whether the run trains a LoRA adapter (`lora_targets:` or `use_peft: true`)."""
        return bool(self.adapters.lora_targets) or bool(self.model.use_peft)

    def save(self, output_dir: str | Path) -> Path:
        """Write the effective recipe to `output_dir/recipe.yaml`."""
        target = Path(output_dir) / "recipe.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        header = f"# Effective recipe of this run (from {self.path or 'the command line'}, with overrides).\n"
        target.write_text(header + yaml.safe_dump(self.values, sort_keys=False))
        return target


def parse_recipe(training_cls: type, argv: list[str] | None = None, task_cls: type | None = None) -> Recipe:
    """Parse `--config RECIPE.yaml [--key value ...]` into a `Recipe` whose training fields are `training_cls`
    (and whose loop-specific fields, if any, are the dataclass `task_cls`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(recipe_help(training_cls, task_cls))
        raise SystemExit(0)
    groups = dataclass_types(training_cls, task_cls)
    parser = TrlParser(groups)
    parser.error = _one_line_error  # a bad `--key value` is one line, not argparse's usage dump
    actions = parser_actions(parser)
    types_of = field_types(groups)

    path, values = None, {}
    if "--config" not in argv and not {"--dataset_name", "--datasets"} & {a.split("=", 1)[0] for a in argv}:
        raise RecipeError(
            "--config: missing; give a recipe (e.g. --config recipes/tiny/sft.yaml) and `--key value` overrides."
        )
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise RecipeError("--config: give the path of a recipe YAML file.")
        path = Path(argv[index + 1])
        del argv[index : index + 2]
        values = read_recipe_file(path)
    values = {key: coerce(key, value, actions, types_of) for key, value in values.items()}
    parser.set_defaults_with_config(**values)

    override_keys = command_line_keys(argv, actions)
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    except RecipeError:
        raise
    except (ValueError, TypeError) as error:
        if "support bf16" in str(error):
            raise RecipeError(
                f"bf16: this machine has no GPU with bf16; set `bf16: false` to train in fp32 on the CPU "
                f"(or `use_cpu: true` to train in bf16 on the CPU) ({path or 'recipe'})."
            ) from None
        raise RecipeError(f"{path or 'recipe'}: {error}") from None
    for key in override_keys:
        owner = next(group for group in parsed if hasattr(group, key))
        values[key] = plain(getattr(owner, key))
    data, training, model, jetmoe, adapters, *task = parsed
    training.jetmoe = jetmoe  # the trainer layer reads the run-level JetMoE keys from its arguments
    if jetmoe.aux_loss_coef is not None and getattr(training, "router_aux_loss_coef", None) is not None:
        raise RecipeError(
            "Set the router loss weight once: `aux_loss_coef` or `router_aux_loss_coef`, not both."
        )
    if getattr(
        training, "push_to_hub", False
    ):  # the Trainer would push from save_model, before our files, unchecked
        raise RecipeError(
            "push_to_hub: the Trainer would upload from inside save_model, before the run's card, recipe.yaml and "
            "metrics.json exist, and unchecked; set `push_to_hub: false` and publish the finished run with "
            "`jetmoe-ft export --model OUTPUT_DIR --output DIR --push_to_hub REPO_ID`."
        )
    recipe = Recipe(
        data, training, model, jetmoe, adapters, task[0] if task else None, path=path, values=values
    )
    check_ranges(recipe)
    return recipe


# (group, key, lowest allowed, whether the lowest itself is allowed, what the value means)
RANGES = (
    ("training", "learning_rate", 0, False, "a learning rate of 0 trains nothing"),
    ("training", "per_device_train_batch_size", 1, True, "rows per device and step"),
    ("training", "per_device_eval_batch_size", 1, True, "rows per device and evaluation step"),
    ("training", "gradient_accumulation_steps", 1, True, "steps summed per optimizer update"),
    ("training", "num_train_epochs", 0, False, "passes over the data"),
    ("training", "warmup_steps", 0, True, "warmup steps (or a fraction below 1)"),
    ("training", "warmup_ratio", 0, True, "a share of the steps"),
    ("training", "weight_decay", 0, True, "decoupled weight decay"),
    ("training", "max_grad_norm", 0, True, "gradient clipping (0: off)"),
    ("training", "max_length", 1, True, "tokens per example"),
    ("training", "logging_steps", 0, False, "steps between logs"),
    ("training", "save_steps", 0, False, "steps between checkpoints"),
    ("training", "eval_steps", 0, False, "steps between evaluations"),
    ("training", "beta", 0, False, "the preference loss temperature"),
    ("model", "lora_r", 1, True, "the LoRA rank"),
    ("model", "lora_alpha", 0, False, "the LoRA scale numerator"),
    ("model", "lora_dropout", 0, True, "a dropout probability"),
    ("task", "max_length", 1, True, "tokens per text"),
    ("data", "max_train_samples", 1, True, "training rows"),
    ("data", "max_eval_samples", 1, True, "evaluation rows"),
)
UPPER = {"lora_dropout": 1, "warmup_ratio": 1}


def check_ranges(recipe: Recipe) -> None:
    """Numbers that cannot run (or silently do nothing) are one line at parse time, before anything loads."""
    for group, key, low, inclusive, meaning in RANGES:
        value = getattr(getattr(recipe, group), key, None)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if (
            group == "training"
            and key == "num_train_epochs"
            and getattr(recipe.training, "max_steps", -1) > 0
        ):
            continue  # max_steps decides
        if key == "beta" and hasattr(recipe.training, "num_generations"):  # online RL: a KL weight, 0 = none
            inclusive, meaning = True, "the KL weight; 0 needs no reference"
        too_low = value < low or (value == low and not inclusive)
        too_high = key in UPPER and value >= UPPER[key]
        if too_low or too_high:
            bound = f"at least {low}" if inclusive else f"above {low}"
            if key in UPPER:
                bound += f" and below {UPPER[key]}"
            raise RecipeError(f"{key}: {value} is out of range ({meaning}); use a number {bound}.")


def _one_line_error(message: str):
    raise RecipeError(message.replace("argument ", "", 1))


def dataclass_types(training_cls: type, task_cls: type | None = None) -> list[type]:
    types_ = [DataArguments, training_cls, ModelConfig, JetMoeArguments, AdapterArguments]
    return types_ + [task_cls] if task_cls is not None else types_


def recipe_keys(training_cls: type, task_cls: type | None = None) -> list[str]:
    """Every key a recipe for `training_cls` (and `task_cls`) accepts."""
    return sorted(field_types(dataclass_types(training_cls, task_cls)))


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
