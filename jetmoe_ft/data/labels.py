"""Labelled texts for classification: class names from the data, labels encoded as the head's ids."""

from __future__ import annotations

from datasets import ClassLabel, Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from ..config import RecipeError
from .sources import load_recipe_datasets


def label_names(train: Dataset, column: str, num_labels: int | None = None) -> list[str]:
    """The class names, in id order: a `ClassLabel`'s names, the sorted string labels, or "0".."n-1"."""
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    elif getattr(feature, "dtype", None) in ("string", "large_string"):
        names = sorted({str(value) for value in train[column]})
    elif getattr(feature, "dtype", "").startswith(("int", "uint")):
        values = train[column]
        names = [str(i) for i in range(num_labels or max(values) + 1)]
    elif len({type(value).__name__ for value in train[column] if value is not None} - {"NoneType"}) > 1:
        kinds = {}
        for row, value in enumerate(train[column]):
            kinds.setdefault(type(value).__name__, (row, value))
        shown = ", ".join(f"{value!r} (row {row})" for row, value in kinds.values())
        raise RecipeError(
            f"{column}: labels mix kinds ({shown}); use class names everywhere or integers everywhere."
        )
    else:
        raise RecipeError(
            f"{column}: labels must be class names or integers, got {feature}; "
            "regression heads are not supported (num_labels: 1 trains a reward model on pairs)."
        )
    if num_labels is not None and num_labels != len(names):
        raise RecipeError(
            f"num_labels: {num_labels}, but the training data has {len(names)} classes "
            f"({', '.join(names[:10])}); drop `num_labels:` to take it from the data."
        )
    if len(names) < 2:
        raise RecipeError(f"{column}: the training data has a single class ({names[0]}); need at least 2.")
    return names


def encode_labels(dataset: Dataset, column: str, label2id: dict[str, int], where: str) -> list[int]:
    """Class ids of `dataset[column]` for a head with `label2id`; one clear error for a label it lacks.

    Names (a `ClassLabel`'s or strings) map by name onto a head with named classes; integers map as they
    are, and must lie in 0..num_labels-1.
    """
    feature = dataset.features[column]
    values = dataset[column]
    num_labels = len(label2id)
    if isinstance(feature, ClassLabel) and has_class_names(label2id):
        _check_ids(values, feature.num_classes, where)
        values = [feature.int2str(value) for value in values]
    if values and isinstance(values[0], str):
        unseen = sorted({value for value in values if value not in label2id})
        if unseen:
            more = f" (and {len(unseen) - 1} more)" if len(unseen) > 1 else ""
            raise RecipeError(
                f"{where}: label {unseen[0]!r}{more} is not one of the model's classes ({', '.join(label2id)})."
            )
        return [label2id[value] for value in values]
    _check_ids(values, num_labels, where)
    return list(values)


def has_class_names(label2id: dict[str, int]) -> bool:
    """Whether the classes have names of their own, not the defaults "0".."n-1" or "LABEL_0".."LABEL_n-1"."""
    defaults = ({str(i) for i in range(len(label2id))}, {f"LABEL_{i}" for i in range(len(label2id))})
    return set(label2id) not in defaults


def _check_ids(values: list, num_labels: int, where: str) -> None:
    bad = sorted(
        {value for value in values if not isinstance(value, int) or not 0 <= value < num_labels}, key=str
    )
    if bad:
        raise RecipeError(
            f"{where}: labels must be in 0..{num_labels - 1} (num_labels {num_labels}); found "
            f"{', '.join(map(str, bad[:5]))}. Remove unlabelled rows (-1); more classes need a larger `num_labels`."
        )


# ---------------------------------------------------------------------------------------------


def load_cls_data(recipe, seed: int) -> tuple[DatasetDict, list[str]]:
    """`text` / `label` splits with integer labels, and the class names; all checks before a model loads."""
    task = recipe.task
    data = load_recipe_datasets(
        recipe.data, "cls", seed=seed, text_field=task.text_column, label_field=task.label_column
    )
    names = label_names(data["train"], task.label_column, task.num_labels)
    label2id = {name: i for i, name in enumerate(names)}
    encoded = DatasetDict()
    for split, dataset in data.items():
        ids = encode_labels(dataset, task.label_column, label2id, f"{split} split")
        texts = [str(text) if text is not None else "" for text in dataset[task.text_column]]
        encoded[split] = Dataset.from_dict({"text": texts, "label": ids})
    return encoded, names


def tokenize_texts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """`input_ids` / `attention_mask` of each text, truncated to `max_length`; other columns but `label` dropped."""
    columns = [name for name in dataset.column_names if name != "label"]
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=columns,
        desc="Tokenizing",
    )
