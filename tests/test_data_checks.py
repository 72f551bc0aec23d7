"""Data that cannot train is one line naming the file and line, or the row and the role, before a model loads."""

import json
from pathlib import Path

import pytest

from jetmoe_ft.cls import cli as cls_cli
from jetmoe_ft.dpo import cli as dpo_cli
from jetmoe_ft.sft import cli as sft_cli

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--max_steps", "1", "--max_length", "48", "--save_strategy", "no", "--report_to", "none"]
HELLO = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi, how are you?"}]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _run(cli, recipe: str, data: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    status = cli(
        ["--config", str(ROOT / "recipes/tiny" / recipe), "--dataset_name", str(data)]
        + ["--output_dir", str(tmp_path / "out"), "--test_split_size", "null", *SHORT]
        + ["--model_name_or_path", "jetmoe-ft/tiny"]
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert not (tmp_path / "out" / "model.safetensors").exists()
    return status, lines[0]


def _sft(tmp_path, capsys, rows=None, raw: bytes | None = None, name="data.jsonl"):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        _write_jsonl(path, rows)
    return _run(sft_cli, "sft.yaml", path, tmp_path, capsys)


def test_a_malformed_jsonl_line_names_the_file_and_line(tmp_path, capsys):
    raw = (json.dumps({"messages": HELLO}) + "\n") * 2 + '{"messages": [}\n'
    status, line = _sft(tmp_path, capsys, raw=raw.encode())
    assert status == 2 and "data.jsonl: line 3 is not valid JSON" in line


def test_an_empty_file_says_so(tmp_path, capsys):
    status, line = _sft(tmp_path, capsys, raw=b"")
    assert status == 2 and "data.jsonl: the file is empty" in line


def test_non_utf8_data_names_the_line(tmp_path, capsys):
    raw = (json.dumps({"text": "fine"}) + "\n").encode() + b'{"text": "caf\xe9"}\n'
    status, line = _sft(tmp_path, capsys, raw=raw)
    assert status == 2 and "line 2 is not UTF-8" in line and "re-encode" in line


def test_a_non_utf8_recipe_names_the_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"dataset_name: chatterbot\n# caf\xe9\n")
    status = sft_cli(["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "line 2 is not UTF-8" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "messages, words",
    [
        (
            [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Hello"}],
            ["role 'human'", "use `user`"],
        ),
        ([{"from": "human", "value": "Hi"}], ["ShareGPT keys"]),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant"}],
            ["message 1 (assistant)", "no `content`"],
        ),
        ([{"role": "user", "content": None}, {"role": "assistant", "content": "x"}], ["message 0 (user)"]),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            ["message 1", "two user turns in a row"],
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            ["system message after"],
        ),
    ],
)
def test_conversation_problems_name_the_row_and_role(tmp_path, capsys, messages, words):
    status, line = _sft(tmp_path, capsys, [{"messages": HELLO}, {"messages": messages}])
    assert status == 2 and "row 1" in line, line
    for word in words:
        assert word in line, line


def test_null_text_names_the_row(tmp_path, capsys):
    status, line = _sft(tmp_path, capsys, [{"text": "some text"}, {"text": None}])
    assert status == 2 and "row 1: `text` is null" in line


def test_every_assistant_turn_empty_is_refused(tmp_path, capsys):
    empty = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]
    status, line = _sft(tmp_path, capsys, [{"messages": empty}] * 3)
    assert status == 2 and "every assistant turn is empty" in line


def test_dpo_text_prompt_with_conversational_answers_is_one_line(tmp_path, capsys):
    # the README's example: a text prompt, chosen/rejected as conversations
    row = {
        "prompt": "Hello there",
        "chosen": [{"role": "assistant", "content": "Hi, how are you?"}],
        "rejected": [{"role": "assistant", "content": "The sky is blue."}],
    }
    path = _write_jsonl(tmp_path / "pairs.jsonl", [row] * 4)
    status, line = _run(dpo_cli, "dpo.yaml", path, tmp_path, capsys)
    assert status == 2 and "prompt: text, but chosen, rejected are conversations" in line


def test_labels_mixing_names_and_integers_say_so(tmp_path, capsys):
    path = _write_jsonl(
        tmp_path / "labels.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": 1}] * 2
    )
    status, line = _run(cls_cli, "cls.yaml", path, tmp_path, capsys)
    assert status == 2 and "labels mix kinds" in line and "'pos' (row 0)" in line and "regression" not in line
