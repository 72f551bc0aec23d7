"""A recipe's data: the sources it names and their mixtures (`sources`), the embedded sets (`embedded`),
the checks and encodings of each kind of data (`preferences`, `labels`), and a run's held-out split
(`held_out`). Every problem is a one-line `RecipeError`, raised before a model loads.

Stage 2. Imports: the recipe parser (`config`) and datasets; no model, adapter or training code."""

from .embedded import EMBEDDED_DATASETS, load_embedded
from .labels import encode_labels, label_names, load_cls_data, tokenize_texts
from .preferences import check_preferences
from .sources import check_columns, load_recipe_datasets

__all__ = [
    "EMBEDDED_DATASETS",
    "check_columns",
    "check_preferences",
    "encode_labels",
    "label_names",
    "load_cls_data",
    "load_embedded",
    "load_recipe_datasets",
    "tokenize_texts",
]
