"""The transformers model API on our classes: tuples, selected hidden states, recorded outputs, the config file."""

import re
from pathlib import Path

import pytest
import torch
import transformers

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification, JetMoeModel
from jetmoe_ft.modeling import configuration_jetmoe

from .conftest import reference_and_ours, tiny_kwargs

CLASSES = [
    (transformers.JetMoeModel, JetMoeModel),
    (transformers.JetMoeForCausalLM, JetMoeForCausalLM),
    (transformers.JetMoeForSequenceClassification, JetMoeForSequenceClassification),
]


def _pair(reference_cls, ours_cls, **overrides):
    return reference_and_ours(reference_cls, ours_cls, num_labels=3, pad_token_id=0, **overrides)


def _inputs(batch=2, length=7):
    ids = torch.randint(1, 128, (batch, length))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("ours_cls", [cls for _, cls in CLASSES], ids=lambda cls: cls.__name__)
def test_return_dict_false_gives_the_tuple_of_the_output(ours_cls):
    model = ours_cls(JetMoeConfig(**tiny_kwargs(num_labels=3, pad_token_id=0))).eval()
    ids, mask = _inputs()
    labels = (
        ids
        if ours_cls is JetMoeForCausalLM
        else torch.tensor([0, 2])
        if ours_cls is not JetMoeModel
        else None
    )
    kwargs = dict(input_ids=ids, attention_mask=mask, output_router_logits=True, output_hidden_states=True)
    if labels is not None:
        kwargs["labels"] = labels
    with torch.no_grad():
        as_dict = model(**kwargs)
        as_tuple = model(**kwargs, return_dict=False)
        model.config.return_dict = False
        from_config = model(**kwargs)
        assert isinstance(model(**kwargs, return_dict=True), transformers.utils.ModelOutput)
    expected = as_dict.to_tuple()
    for got in (as_tuple, from_config):
        assert isinstance(got, tuple) and not isinstance(got, transformers.utils.ModelOutput)
        assert len(got) == len(expected)
        for value, want in zip(got, expected, strict=True):
            if isinstance(want, torch.Tensor):
                torch.testing.assert_close(value, want)
    if ours_cls is JetMoeForCausalLM:
        loss, aux_loss, logits, *rest = as_tuple
        torch.testing.assert_close(loss, as_dict.loss)
        torch.testing.assert_close(logits, as_dict.logits)
        assert len(rest) == 3  # cache, hidden states, router logits


@pytest.mark.parametrize("selection", [[0, 2], [-1], 1, [0, -2, 5]], ids=str)
def test_output_hidden_states_selects_layers_like_transformers(selection):
    reference, ours = _pair(transformers.JetMoeForCausalLM, JetMoeForCausalLM)
    ids, mask = _inputs()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, output_hidden_states=selection).hidden_states
        got = ours(input_ids=ids, attention_mask=mask, output_hidden_states=selection).hidden_states
        every = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(got) == len(every) == 3  # embeddings + one per layer (the last one after the final norm)
    kept = {i % 3 for i in ([selection] if isinstance(selection, int) else selection) if -3 <= i < 3}
    assert [h is not None for h in got] == [i in kept for i in range(3)]
    assert [h is not None for h in got] == [h is not None for h in expected]
    for index in kept:
        torch.testing.assert_close(got[index], every[index])
        torch.testing.assert_close(
            got[index][mask.bool()], expected[index][mask.bool()], atol=1e-5, rtol=1e-5
        )


def test_recorded_attentions_and_router_logits_match_transformers():
    reference, ours = _pair(transformers.JetMoeForCausalLM, JetMoeForCausalLM)
    for model in (reference, ours):
        model.set_attn_implementation("eager")
    ids, mask = _inputs()
    kwargs = dict(input_ids=ids, attention_mask=mask, output_attentions=True, output_router_logits=True)
    with torch.no_grad():
        expected, got = reference(**kwargs), ours(**kwargs)
    assert len(got.attentions) == 2 and got.attentions[0].shape == (2, 4, 7, 7)
    real = mask.bool()
    for mine, theirs in zip(got.attentions, expected.attentions, strict=True):  # heads in transformers' order
        torch.testing.assert_close(
            mine.transpose(1, 2)[real], theirs.transpose(1, 2)[real], atol=1e-5, rtol=1e-5
        )
    assert len(got.router_logits) == len(expected.router_logits) == 4  # MoA, MoE per layer, in that order
    flat_real = real.reshape(-1)
    for mine, theirs in zip(got.router_logits, expected.router_logits, strict=True):
        torch.testing.assert_close(mine[flat_real], theirs[flat_real], atol=1e-5, rtol=1e-5)


def test_sdpa_records_no_attentions_and_nothing_leaks_between_calls():
    model = JetMoeModel(JetMoeConfig(**tiny_kwargs())).eval()
    ids, _ = _inputs()
    with torch.no_grad():
        recorded = model(
            input_ids=ids, output_attentions=True, output_hidden_states=True, output_router_logits=True
        )
        plain = model(input_ids=ids)
    assert recorded.attentions == ()  # sdpa returns no weights, as with transformers' classes
    assert len(recorded.hidden_states) == 3 and len(recorded.router_logits) == 4
    assert plain.hidden_states is None and plain.attentions is None and plain.router_logits is None
    model.config.output_hidden_states = True  # config defaults apply when the call says nothing
    with torch.no_grad():
        assert len(model(input_ids=ids).hidden_states) == 3


def test_router_logits_are_recorded_once_with_gradient_checkpointing():
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs()))
    model.gradient_checkpointing_enable()
    model.train()
    ids, _ = _inputs()
    out = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
    out.loss.backward()
    assert len(out.router_logits) == 4
    assert model.model.layers[0].mlp.router.layer.weight.grad is not None


@pytest.mark.parametrize(
    "classes",
    [
        (transformers.JetMoeConfig, transformers.JetMoeModel),  # the control: transformers' own passes
        (JetMoeConfig, JetMoeModel),
        (JetMoeConfig, JetMoeForCausalLM),
        (JetMoeConfig, JetMoeForSequenceClassification),
    ],
    ids=lambda classes: f"{classes[1].__module__.split('.')[0]}-{classes[1].__name__}",
)
def test_retain_grad_on_returned_hidden_states_and_attentions(classes):
    """transformers' `test_retain_grad_hidden_states_attentions`: the hidden states and attention weights we
    return are the tensors in the autograd graph, so `.retain_grad()` on them gets a gradient."""
    config_cls, model_cls = classes
    config = config_cls(**tiny_kwargs(), pad_token_id=127)  # not 0: its zero embedding row is the tied logit 0
    config.output_hidden_states = True
    config.output_attentions = True
    model = model_cls(config)
    outputs = model(input_ids=torch.randint(0, 127, (2, 7)), attention_mask=torch.ones(2, 7, dtype=torch.long))
    hidden_states, attentions = outputs.hidden_states[0], outputs.attentions[0]
    hidden_states.retain_grad()
    attentions.retain_grad()
    outputs[0].flatten()[0].backward(retain_graph=True)
    assert hidden_states.grad is not None and attentions.grad is not None
    assert attentions.grad.abs().sum() > 0


def test_configuration_file_has_a_licence_header_with_a_year():
    for path in (
        Path(configuration_jetmoe.__file__),
        Path(configuration_jetmoe.__file__).with_name("modeling_jetmoe.py"),
    ):
        head = path.read_text().splitlines()[:15]
        assert re.match(r"# Copyright (\d{4}) ", head[0]), path.name
        assert any("Licensed under the Apache License, Version 2.0" in line for line in head), path.name
