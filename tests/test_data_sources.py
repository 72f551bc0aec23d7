import json
import re

import pytest
from datasets import Dataset, DatasetDict

from jetmoe_ft.config import DataArguments, RecipeError
from jetmoe_ft.data.sources import load_recipe_datasets


def _chat_rows(n, offset=0):
    return [
        {
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "id": i,
        }
        for i in range(offset, offset + n)
    ]


def test_embedded_source_has_train_and_test():
    splits = load_recipe_datasets(DataArguments(dataset_name="chatterbot"), "sft")
    assert set(splits) == {"train", "test"} and "messages" in splits["train"].column_names


def test_local_jsonl_csv_and_saved_folders(tmp_path):
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in _chat_rows(20)))
    splits = load_recipe_datasets(DataArguments(dataset_name=str(jsonl), test_split_size=0.25), "sft")
    assert len(splits["train"]) == 15 and len(splits["test"]) == 5

    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\n" + "\n".join(f"review {i},{i % 2}" for i in range(10)))
    splits = load_recipe_datasets(DataArguments(dataset_name=str(csv), max_train_samples=4), "cls")
    assert len(splits["train"]) == 4 and "test" not in splits

    folder = tmp_path / "saved"
    DatasetDict(
        train=Dataset.from_list(_chat_rows(6)), test=Dataset.from_list(_chat_rows(2, 6))
    ).save_to_disk(folder)
    splits = load_recipe_datasets(DataArguments(dataset_name=str(folder)), "sft")
    assert (len(splits["train"]), len(splits["test"])) == (6, 2)


def test_mixture_weights_columns_and_test_splits(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(json.dumps(row) for row in _chat_rows(10)))
    second.write_text("\n".join(json.dumps(row) for row in _chat_rows(4, 100)))
    args = DataArguments(
        datasets=[
            {"path": str(first), "weight": 0.5, "columns": ["messages"]},
            {"path": str(second), "weight": 2, "columns": ["messages"]},
            {"path": "chatterbot", "columns": ["messages"]},
        ]
    )
    splits = load_recipe_datasets(args, "sft")
    embedded = load_recipe_datasets(DataArguments(dataset_name="chatterbot"), "sft")
    assert len(splits["train"]) == 5 + 8 + len(embedded["train"])
    assert splits["train"].column_names == ["messages"]
    assert len(splits["test"]) == len(embedded["test"])  # only the embedded source has a test split


@pytest.mark.parametrize(
    "args, task, message",
    [
        (DataArguments(dataset_name="./missing.jsonl"), "sft", "no such file or folder"),
        (DataArguments(dataset_name="chatterbot_pairs"), "sft", "sft needs `messages`"),
        (DataArguments(dataset_name="chatterbot"), "dpo", "dpo needs `chosen` + `rejected`"),
        (
            DataArguments(dataset_name="chatterbot", dataset_train_split="validation"),
            "sft",
            "no split `validation`",
        ),
        (DataArguments(dataset_name="nobody/no-such-data-set"), "sft", "not an embedded data set"),
        (DataArguments(datasets=[{"path": "chatterbot", "columns": ["text"]}]), "sft", "no column text"),
    ],
)
def test_bad_data_is_named(args, task, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=re.escape(message)) as error:
        load_recipe_datasets(args, task)
    assert "\n" not in str(error.value)


def test_missing_columns_lists_what_the_data_has():
    with pytest.raises(RecipeError, match="the data has chosen, prompt, rejected"):
        load_recipe_datasets(DataArguments(dataset_name="chatterbot_pairs"), "sft")


def test_empty_split_fails(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps(_chat_rows(1)[0]))
    with pytest.raises(RecipeError, match="empty"):
        load_recipe_datasets(DataArguments(dataset_name=str(path), max_train_samples=0), "sft")
