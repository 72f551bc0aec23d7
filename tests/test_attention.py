import importlib.util

import pytest
import torch

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM

from .conftest import randomize_biases, tiny_kwargs


def _model(attn_implementation="sdpa", **overrides):
    torch.manual_seed(0)
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(**overrides)))
    randomize_biases(model)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def test_sdpa_is_the_default_and_eager_agrees():
    model = _model()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(1, 128, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        sdpa = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    real = mask.bool()
    torch.testing.assert_close(eager.logits[real], sdpa[real], atol=1e-5, rtol=1e-5)
    assert len(eager.attentions) == 2 and eager.attentions[0].shape == (2, 4, 13, 13)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_the_package_is_a_clear_error():
    with pytest.raises(ImportError, match="FlashAttention2 .* installed"):
        JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(), attn_implementation="flash_attention_2"))
    with pytest.raises(ImportError, match="FlashAttention2"):
        _model().set_attn_implementation("flash_attention_2")


def _packed(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(1, 128, (n,), generator=generator) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu_seq_lens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return sequences, torch.cat(sequences)[None], position_ids, cu_seq_lens


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_sequences_get_the_logits_they_get_alone(attn_implementation, use_cache):
    model = _model(attn_implementation)
    sequences, packed_ids, position_ids, cu_seq_lens = _packed([5, 9, 3, 7])
    with torch.no_grad():
        alone = torch.cat([model(input_ids=seq[None], use_cache=use_cache).logits[0] for seq in sequences])
        by_position = model(input_ids=packed_ids, position_ids=position_ids, use_cache=use_cache).logits[0]
        by_cu_seq_lens = model(
            input_ids=packed_ids,
            use_cache=use_cache,
            cu_seq_lens_q=cu_seq_lens,
            cu_seq_lens_k=cu_seq_lens,
            max_length_q=9,
            max_length_k=9,
        ).logits[0]
    torch.testing.assert_close(by_position, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_cu_seq_lens, alone, atol=1e-5, rtol=1e-5)
