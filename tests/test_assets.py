"""The embedded tokenizer (built from mistral-common's SentencePiece model) and the tiny model."""

import json

import jinja2
import pytest
import sentencepiece as spm
import torch
from transformers import AutoTokenizer

from jetmoe_ft import JetMoeForCausalLM, JetMoeForSequenceClassification, assets
from jetmoe_ft.assets import CACHE_ENV, TINY_CONFIG, build_tiny_model, load_tokenizer, tiny_config

SENTENCES = [
    "Hello world!",
    "What is AI? Artificial Intelligence is the branch of engineering and science.",
    "A heart-wrenching documentary about the 1.6 million orphans in Uganda.",
]
ROUND_TRIP = SENTENCES + [
    "Ünïcödé 日本語 🙂 emoji",
    "def f(x):\n    return x + 1\n",
    "line one\n\nline two\ttabbed",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is AI?"},
    {"role": "assistant", "content": "A field of science."},
    {"role": "user", "content": "Are you sentient?"},
    {"role": "assistant", "content": "Sort of."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(tmp_path_factory.mktemp("cache") / "tokenizer")


def test_size_and_special_tokens(tokenizer):
    assert len(tokenizer) == tokenizer.vocab_size == 32000
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 0)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<unk>", 0)
    assert tokenizer.padding_side == "right"


def test_matches_sentencepiece_on_plain_text(tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(assets.source_model_path()))
    for text in SENTENCES:
        assert tokenizer(text, add_special_tokens=False).input_ids == sp.encode(text)
        # bos first, no eos: the Llama convention.
        assert tokenizer(text).input_ids == [1, *sp.encode(text)]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert 0 not in ids  # byte fallback: nothing is unknown
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_batch_pads_right_with_unk(tokenizer):
    batch = tokenizer(["Hi", "A much longer sentence here"], padding=True)
    short, long = batch.input_ids
    assert len(short) == len(long)
    assert short[-1] == 0 and batch.attention_mask[0][-1] == 0
    assert all(batch.attention_mask[1])


def test_chat_template_renders_system_once(tokenizer):
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text == (
        "<s><|system|>\nBe brief.\n<|user|>\nWhat is AI?\n<|assistant|>\nA field of science.</s>\n"
        "<|user|>\nAre you sentient?\n<|assistant|>\nSort of.</s>\n"
    )
    ids = tokenizer.apply_chat_template(CHAT, return_dict=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.apply_chat_template(CHAT[1:], tokenize=False).count("<|system|>") == 0


def test_chat_template_rejects_late_system_and_unknown_roles(tokenizer):
    with pytest.raises(jinja2.TemplateError, match="first message"):
        tokenizer.apply_chat_template([CHAT[1], CHAT[0]], tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="Unknown role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_assistant_mask_covers_exactly_the_answers(tokenizer):
    out = tokenizer.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    spans, span = [], []
    for token, flag in zip(ids, mask, strict=True):
        if flag:
            span.append(token)
        elif span:
            spans.append(span)
            span = []
    assert [tokenizer.decode(s) for s in spans] == ["A field of science.</s>", "Sort of.</s>"]


def test_trl_accepts_the_template_for_assistant_only_loss(tokenizer):
    from trl.chat_template_utils import has_generation_markers
    from trl.trainer.sft_trainer import is_chat_template_stop_token_trained

    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)  # eos is inside the assistant mask


def test_generation_prompt_is_a_prefix_of_the_answered_chat(tokenizer):
    text = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|user|>\nWhat is AI?\n<|assistant|>\n")
    prompt = tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    full = tokenizer.apply_chat_template(CHAT[:3], return_dict=True)["input_ids"]
    # TRL tokenizes prompt and completion from these two renderings: the prompt must be a prefix.
    assert full[: len(prompt)] == prompt
    assert full[-2:] == [tokenizer.eos_token_id, tokenizer("\n", add_special_tokens=False).input_ids[-1]]


def test_cache_is_written_once_then_read(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    first = load_tokenizer()
    cache = tmp_path / "tokenizer"
    assert (cache / "tokenizer.json").is_file()
    assert list(tmp_path.iterdir()) == [cache]  # no temporary folders left behind

    def no_build():
        raise AssertionError("the cached tokenizer should have been read")

    monkeypatch.setattr(assets, "_build_tokenizer", no_build)
    second = load_tokenizer()
    assert second.name_or_path == str(cache)
    assert second(SENTENCES[1]).input_ids == first(SENTENCES[1]).input_ids
    assert second.chat_template == first.chat_template
    assert second.pad_token_id == 0 and second.padding_side == "right"


def test_broken_cache_is_rebuilt(tmp_path):
    cache = tmp_path / "tokenizer"
    cache.mkdir()
    (cache / "tokenizer.json").write_text("{not json")
    tokenizer = load_tokenizer(cache)
    assert tokenizer("Hello").input_ids == [1, 22557]
    json.loads((cache / "tokenizer.json").read_text())
    assert list(tmp_path.iterdir()) == [cache]


def test_saved_tokenizer_reloads_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(SENTENCES[0]).input_ids == tokenizer(SENTENCES[0]).input_ids
    assert reloaded.chat_template == tokenizer.chat_template
    assert (reloaded.pad_token, reloaded.padding_side) == ("<unk>", "right")


def test_tiny_config():
    config = tiny_config(num_hidden_layers=2)
    assert config.num_hidden_layers == 2
    assert (config.hidden_size, config.num_key_value_heads, config.kv_channels) == (256, 4, 32)
    assert (config.num_local_experts, config.num_experts_per_tok, config.vocab_size) == (8, 2, 32000)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert config.tie_word_embeddings and config.max_position_embeddings == 1024
    assert TINY_CONFIG["num_hidden_layers"] == 4  # overrides do not leak into the defaults


def _same_weights(a, b) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_tiny_model_is_deterministic_in_the_seed():
    rng_before = torch.get_rng_state()
    first, again, other = build_tiny_model(0), build_tiny_model(0), build_tiny_model(1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched
    assert isinstance(first, JetMoeForCausalLM)
    assert _same_weights(first, again)
    assert not _same_weights(first, other)
    assert 20e6 < sum(p.numel() for p in first.parameters()) < 26e6
    assert first.lm_head.weight.data_ptr() == first.model.embed_tokens.weight.data_ptr()


def test_tiny_model_other_heads_and_overrides():
    model = build_tiny_model(3, cls=JetMoeForSequenceClassification, num_labels=2, num_hidden_layers=1)
    assert isinstance(model, JetMoeForSequenceClassification)
    assert model.config.num_labels == 2 and len(model.model.layers) == 1
    logits = model(input_ids=torch.tensor([[1, 22557, 0]]), attention_mask=torch.tensor([[1, 1, 0]])).logits
    assert logits.shape == (1, 2)
