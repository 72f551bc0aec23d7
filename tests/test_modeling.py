import pytest
import torch
import transformers

import jetmoe_ft
from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification, JetMoeModel

from .conftest import reference_and_ours, tiny_kwargs


def test_public_names():
    for name in ("JetMoeConfig", "JetMoeModel", "JetMoeForCausalLM", "JetMoeForSequenceClassification"):
        assert getattr(jetmoe_ft, name) is getattr(jetmoe_ft.modeling, name)
    assert issubclass(JetMoeModel, jetmoe_ft.modeling.JetMoePreTrainedModel)


def test_state_dict_names_and_shapes_match_transformers():
    reference, ours = reference_and_ours(transformers.JetMoeForCausalLM, JetMoeForCausalLM)
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    mine = {k: v.shape for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert mine["model.layers.0.mlp.input_linear.weight"] == (4, 2 * 96, 64)  # [E, out, in]
    assert mine["model.layers.0.self_attention.experts.input_linear.weight"] == (4, 2 * 16, 64)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied by default


def test_from_pretrained_both_ways(tmp_path):
    reference, ours = reference_and_ours(transformers.JetMoeForCausalLM, JetMoeForCausalLM)
    reference.save_pretrained(tmp_path / "theirs")
    loaded, info = JetMoeForCausalLM.from_pretrained(tmp_path / "theirs", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(loaded.eval()(ids).logits, expected, atol=1e-4, rtol=1e-4)

    ours.save_pretrained(tmp_path / "ours")
    back, info = transformers.JetMoeForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, expected, atol=1e-4, rtol=1e-4)


PARITY_CONFIGS = [
    dict(num_experts_per_tok=1, num_local_experts=4),
    dict(num_experts_per_tok=2, num_local_experts=6),
    dict(num_experts_per_tok=3, num_local_experts=8),
    dict(num_experts_per_tok=2, num_local_experts=8, tie_word_embeddings=False),
    dict(num_experts_per_tok=2, num_local_experts=4, moe_backend="loop", rms_norm_eps=1e-5),
]


@pytest.mark.parametrize(
    "overrides", PARITY_CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_logits_match_transformers(overrides):
    reference, ours = reference_and_ours(transformers.JetMoeForCausalLM, JetMoeForCausalLM, **overrides)
    ids = torch.randint(1, 128, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, :11] = 0
    with torch.no_grad():
        for kwargs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
            expected = reference(**kwargs).logits
            got = ours(**kwargs).logits
            real = kwargs.get("attention_mask", mask.new_ones(mask.shape)).bool()
            torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_untied_weights_stay_untied(tmp_path):
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(tie_word_embeddings=False)))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = JetMoeForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_sequence_classification_matches_transformers(padding_side):
    reference, ours = reference_and_ours(
        transformers.JetMoeForSequenceClassification,
        JetMoeForSequenceClassification,
        num_labels=3,
        pad_token_id=0,
    )
    ids = torch.randint(1, 128, (3, 12))
    lengths = [12, 7, 3]
    for row, length in enumerate(lengths):
        if padding_side == "left":
            ids[row, : 12 - length] = 0
        else:
            ids[row, length:] = 0
    mask = (ids != 0).long()
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.loss, expected.loss, atol=1e-4, rtol=1e-4)
        if padding_side == "right":  # without a mask the pad id finds the same last tokens
            torch.testing.assert_close(ours(input_ids=ids).logits, got.logits)
        # each row alone, unpadded, gives its own logits
        for row in range(len(lengths)):
            alone = ids[row][mask[row].bool()][None]
            torch.testing.assert_close(ours(input_ids=alone).logits[0], got.logits[row], atol=1e-4, rtol=1e-4)


def test_sequence_classification_without_pad_token_says_what_to_do():
    model = JetMoeForSequenceClassification(JetMoeConfig(**tiny_kwargs(num_labels=2))).eval()
    with pytest.raises(ValueError, match="pad_token_id"):
        model(input_ids=torch.randint(1, 128, (2, 5)))


@pytest.mark.parametrize("left_padding", [False, True])
def test_greedy_generation_matches_transformers(left_padding):
    reference, ours = reference_and_ours(transformers.JetMoeForCausalLM, JetMoeForCausalLM, pad_token_id=0)
    ids = torch.randint(1, 128, (2, 8))
    mask = torch.ones_like(ids)
    if left_padding:
        ids[1, :3] = 0
        mask[1, :3] = 0
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = reference.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = ours.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, expected)
    # the KV cache changes nothing: the last step's logits equal a full forward over the sequence
    with torch.no_grad():
        full_mask = torch.cat([mask, torch.ones(2, 11, dtype=mask.dtype)], dim=1)
        full = ours(input_ids=got[:, :-1], attention_mask=full_mask, use_cache=False).logits
    assert torch.equal(full[:, -1].argmax(-1), got[:, -1])


@pytest.mark.parametrize("row_multiple", [None, 8])
@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_gradients_match_transformers(backend, row_multiple):
    """Training signal, not only logits: every parameter's gradient equals transformers' (its index_add path)."""
    reference, ours = reference_and_ours(
        transformers.JetMoeForCausalLM,
        JetMoeForCausalLM,
        num_local_experts=6,
        moe_backend=backend,
        expert_row_multiple=row_multiple,
    )
    ids = torch.randint(1, 128, (2, 15))
    for model in (reference, ours):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)
