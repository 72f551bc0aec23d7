"""Checks of a data source before anything trains on it: the file reads (UTF-8, valid JSON lines, not empty), and
every row holds what its kind of training needs (conversations with known roles, text in each turn, turns that
alternate, some assistant text). Each problem is one `RecipeError` naming the file or source, the row and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset

from ..config import RecipeError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
CONVERSATION_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")
TEXT_COLUMNS = {
    "sft": ("text", "prompt", "completion"),
    "dpo": ("prompt", "chosen", "rejected"),
    "rm": ("prompt", "chosen", "rejected"),
    "cls": (),
}
SCAN_LIMIT = 512 * 2**20
"""Files up to this size are read through before loading; larger ones only when the loader fails."""


def check_file(path: Path) -> None:
    """A local json/jsonl/csv file is not empty, is UTF-8, and (json lines) every line parses; the first problem
    is one line naming the file and the line."""
    size = path.stat().st_size
    if size == 0:
        raise RecipeError(f"{path}: the file is empty; point the recipe at a file with rows.")
    if size <= SCAN_LIMIT:
        scan_file(path)


def scan_file(path: Path) -> None:
    """Read `path` through: UTF-8 everywhere; for json/jsonl, one JSON value per line (or one JSON document)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}: line {line} is not UTF-8 (byte {raw[error.start]:#04x} at offset {error.start}); "
            "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None
    if not text.strip():
        raise RecipeError(f"{path}: the file is empty; point the recipe at a file with rows.")
    if path.suffix not in (".json", ".jsonl"):
        return
    if path.suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            json.loads(text)
            return
        except json.JSONDecodeError:
            pass  # maybe JSON lines in a .json file: checked line by line below
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as error:
            raise RecipeError(
                f"{path}: line {number} is not valid JSON ({error.msg} at column {error.colno}); "
                "each line of a .jsonl file is one JSON object."
            ) from None


def check_rows(dataset: Dataset, task: str, where: str) -> None:
    """Every row of `dataset` holds what `task` needs: text that is not null, and conversations whose messages
    have a known role and text content, alternate user / assistant, and (for SFT) give the assistant something."""
    columns = [column for column in CONVERSATION_COLUMNS if column in dataset.column_names]
    text_columns = [column for column in TEXT_COLUMNS.get(task, ()) if column in dataset.column_names]
    checked = sorted(set(columns) | set(text_columns))
    if not checked:
        return
    assistant_text = False
    has_messages = "messages" in dataset.column_names
    offset = 0
    for batch in dataset.select_columns(checked).iter(batch_size=1000):
        count = len(batch[checked[0]])
        for index in range(count):
            row = offset + index
            for column in checked:
                value = batch[column][index]
                if value is None and column in text_columns:
                    raise RecipeError(
                        f"{where}: row {row}: `{column}` is null; remove the row or give it text."
                    )
                if isinstance(value, list):
                    assistant_text |= _check_conversation(value, f"{where}: row {row}, `{column}`")
            if task == "sft" and has_messages:
                _check_turn_order(batch["messages"][index], f"{where}: row {row}")
            elif task in ("dpo", "rm") and "chosen" in batch and isinstance(batch["chosen"][index], list):
                prompt = batch["prompt"][index] if "prompt" in batch else []
                if isinstance(prompt, list):  # a text prompt with conversations: `check_preferences` says so
                    _check_turn_order([*prompt, *batch["chosen"][index]], f"{where}: row {row}")
        offset += count
    if task == "sft" and has_messages and not assistant_text:
        raise RecipeError(
            f"{where}: every assistant turn is empty, so there is nothing to learn; check the `content` of the "
            "assistant messages (or the column the conversations come from)."
        )


def _check_conversation(messages: list, where: str) -> bool:
    """Each message a mapping with a known `role` and text `content`; whether any assistant turn has text."""
    assistant_text = False
    for number, message in enumerate(messages):
        at = f"{where} message {number}"
        if not isinstance(message, dict):
            raise RecipeError(f"{at}: expected a mapping with `role` and `content`, got {message!r:.60}.")
        role = message.get("role")
        if role is None and "from" in message:
            raise RecipeError(
                f"{at}: ShareGPT keys (`from`/`value`); convert to `role`/`content` with roles user / assistant."
            )
        if role not in ROLES:
            hint = f" (ShareGPT's `{role}`: use `{SHAREGPT_ROLES[role]}`)" if role in SHAREGPT_ROLES else ""
            raise RecipeError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}{hint}.")
        content = message.get("content")
        if content is None:
            raise RecipeError(f"{at} ({role}): no `content` (missing or null); give every message its text.")
        if not isinstance(content, str | list):
            raise RecipeError(f"{at} ({role}): `content` must be text, got {type(content).__name__}.")
        assistant_text |= role == "assistant" and bool(str(content).strip())
    return assistant_text


def _check_turn_order(messages: list, where: str) -> None:
    """System messages only first; then user and assistant turns alternate (tool results follow the assistant)."""
    previous = None
    for number, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            if number and previous != "system":
                raise RecipeError(
                    f"{where} message {number}: a system message after the conversation started; put it first."
                )
        elif role in ("user", "assistant") and role == previous:
            raise RecipeError(
                f"{where} message {number}: two {role} turns in a row; user and assistant turns must alternate "
                "(merge the two messages)."
            )
        previous = role
