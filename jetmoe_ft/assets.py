"""The embedded default: a tokenizer built from a wheel we install, and a tiny random JetMoE.

Nothing here touches the network. The tokenizer is mistral-common's SentencePiece model
`tokenizer.model.v1` (32,000 pieces, unk 0, bos 1, eos 2: the size and specials of JetMoE's Llama
tokenizer), converted once to a fast `LlamaTokenizer` and cached on disk.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

from .modeling import JetMoeConfig, JetMoeForCausalLM

EMBEDDED_TOKENIZER = "jetmoe-ft/embedded"
"""Name that recipes use for the embedded tokenizer (resolved by `load_tokenizer`, never the hub)."""
TINY_MODEL = "jetmoe-ft/tiny"
"""Name that recipes use for the tiny random model (resolved by `build_tiny_model`)."""

CACHE_ENV = "JETMOE_FT_CACHE"
SOURCE_MODEL = "tokenizer.model.v1"

# Zephyr-style turn markers (the format of JetMoE-8B-chat). Only assistant turns end with eos, inside
# `{% generation %}` so `return_assistant_tokens_mask=True` marks the answer and its eos. Each marker
# ends with a newline so a generation prompt never ends in a space (the next token is the answer's own).
# Recipes for other tokenizers point `chat_template_path:` at the same file.
CHAT_TEMPLATE_PATH = Path(__file__).parent / "chat_templates" / "zephyr.jinja"
CHAT_TEMPLATE = CHAT_TEMPLATE_PATH.read_text()

TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_key_value_heads": 4,
    "kv_channels": 32,
    "intermediate_size": 512,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def cache_root() -> Path:
    """jetmoe-ft's cache folder: `$JETMOE_FT_CACHE`, else `~/.cache/jetmoe_ft`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jetmoe_ft"


def source_model_path() -> Path:
    """mistral-common's packaged SentencePiece model."""
    path = importlib.resources.files("mistral_common") / "data" / SOURCE_MODEL
    return Path(str(path))


def load_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The embedded tokenizer, converted on first use and read from `cache_dir` afterwards.

    `cache_dir` holds the saved tokenizer itself (default `cache_root() / "tokenizer"`). bos is added
    to plain text; the chat template adds its own bos (`apply_chat_template` does not add specials).
    pad = unk: byte fallback means `<unk>` never appears in real text. Padding is on the right, for
    training; set `padding_side = "left"` for batched generation.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizer"
    tokenizer = _read_cache(cache_dir)
    if tokenizer is None:
        _write_cache(cache_dir)
        tokenizer = _read_cache(cache_dir)
        if tokenizer is None:
            raise RuntimeError(f"Could not read the tokenizer just written to {cache_dir}.")
    return _configure(tokenizer)


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """Convert the SentencePiece model (the slow part, hence the cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        # The conversion reads a folder holding `tokenizer.model`.
        shutil.copyfile(source_model_path(), Path(tmp) / "tokenizer.model")
        tokenizer = LlamaTokenizerFast.from_pretrained(tmp, local_files_only=True, add_bos_token=True)
    return _configure(tokenizer)


def _configure(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Settings that live in code, applied on every load so a cache from an older version gets them."""
    tokenizer.add_bos_token = True
    tokenizer.add_eos_token = False
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "right"
    tokenizer.chat_template = CHAT_TEMPLATE
    # `save_pretrained` writes the init kwargs: keep padding_side, drop how this copy happened to load.
    tokenizer.init_kwargs["padding_side"] = "right"
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def _read_cache(cache_dir: Path) -> PreTrainedTokenizerFast | None:
    """The cached tokenizer, or None when the cache is missing or unreadable."""
    if not (cache_dir / "tokenizer.json").is_file():
        return None
    try:
        return LlamaTokenizerFast.from_pretrained(str(cache_dir), local_files_only=True)
    except Exception:
        return None


def _write_cache(cache_dir: Path) -> None:
    """Save into a temporary sibling, then rename: a killed process leaves no half-written cache."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    try:
        _build_tokenizer().save_pretrained(str(tmp))
        if cache_dir.exists():
            if _read_cache(cache_dir) is not None:
                return  # another process finished first
            _discard(cache_dir)
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            # Another process renamed its complete copy into place first; use that one.
            if _read_cache(cache_dir) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(path: Path) -> None:
    """Move an unreadable cache aside before deleting it, so the rename target is free."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def tiny_config(**overrides: Any) -> JetMoeConfig:
    """`JetMoeConfig` of the tiny model (`TINY_CONFIG`), with `overrides` applied."""
    return JetMoeConfig(**{**TINY_CONFIG, **overrides})


def build_tiny_model(seed: int = 0, cls: type = JetMoeForCausalLM, **config_overrides: Any):
    """A randomly initialised tiny JetMoE; the same seed gives bit-identical weights.

    The global RNG state is left as it was.
    """
    config = tiny_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.name_or_path = TINY_MODEL  # what PEFT writes as an adapter's base model
    return model


__all__ = [
    "CACHE_ENV",
    "CHAT_TEMPLATE",
    "CHAT_TEMPLATE_PATH",
    "EMBEDDED_TOKENIZER",
    "TINY_CONFIG",
    "TINY_MODEL",
    "build_tiny_model",
    "cache_root",
    "load_tokenizer",
    "source_model_path",
    "tiny_config",
]
