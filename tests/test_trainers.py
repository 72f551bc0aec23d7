"""The JetMoE trainer layer: the router loss is added once, in training only, and logged, in every loop."""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, TrainingArguments
from trl import DPOConfig, DPOTrainer, KTOConfig, RewardConfig, SFTConfig
from trl.experimental.cpo import CPOConfig
from trl.experimental.orpo import ORPOConfig

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM, JetMoeForSequenceClassification
from jetmoe_ft.assets import load_tokenizer
from jetmoe_ft.cls import JetMoeClassificationTrainer
from jetmoe_ft.data.unpaired import unpair
from jetmoe_ft.dpo import JetMoeDPOTrainer
from jetmoe_ft.kto import JetMoeKTOTrainer
from jetmoe_ft.orpo import JetMoeORPOTrainer, JetMoeSimPOTrainer
from jetmoe_ft.rm import JetMoeRewardTrainer
from jetmoe_ft.sft import JetMoeSFTTrainer

from .conftest import tiny_kwargs

COMMON = dict(
    report_to="none",
    use_cpu=True,
    max_steps=1,
    logging_steps=1,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    save_strategy="no",
    disable_tqdm=True,
    learning_rate=1e-3,
)
PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"Could you help me with task number {i}?"}],
        "chosen": [{"role": "assistant", "content": "Yes, gladly."}],
        "rejected": [{"role": "assistant", "content": "No. Go away, " + "really " * i}],
    }
    for i in range(4)
]
CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"Say {word}."},
            {"role": "assistant", "content": word * (i + 1)},
        ]
    }
    for i, word in enumerate(["yes ", "no ", "maybe ", "fine "])
]
TEXTS = ["A fine film.", "Dull and long, a waste of an evening.", "Great!", "Not good at all."]


def _sft(tmp_path, coef):
    model = _model(JetMoeForCausalLM, coef)
    args = SFTConfig(str(tmp_path), max_length=32, gradient_checkpointing=False, **COMMON)
    return JetMoeSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(CHATS), processing_class=load_tokenizer()
    )


def _dpo(tmp_path, coef):
    model = _model(JetMoeForCausalLM, coef)
    args = DPOConfig(str(tmp_path), max_length=48, gradient_checkpointing=False, **COMMON)
    return JetMoeDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval(),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=load_tokenizer(),
    )


def _classifier(tmp_path, coef):
    tokenizer = load_tokenizer()
    rows = [{**tokenizer(text), "label": i % 2} for i, text in enumerate(TEXTS)]
    return JetMoeClassificationTrainer(
        model=_model(JetMoeForSequenceClassification, coef, num_labels=2),
        args=TrainingArguments(str(tmp_path), **COMMON),
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def _reward(tmp_path, coef):
    pairs = Dataset.from_list(
        [{"chosen": text, "rejected": other} for text, other in zip(TEXTS, TEXTS[::-1], strict=True)]
    )
    args = RewardConfig(str(tmp_path), bf16=False, gradient_checkpointing=False, **COMMON)
    return JetMoeRewardTrainer(
        model=_model(JetMoeForSequenceClassification, coef, num_labels=1),
        args=args,
        train_dataset=pairs,
        processing_class=load_tokenizer(),
    )


def _model(cls, coef, **config):
    torch.manual_seed(0)
    return cls(JetMoeConfig(**tiny_kwargs(vocab_size=32000), aux_loss_coef=coef, pad_token_id=0, **config))


LOOPS = {"sft": _sft, "dpo": _dpo, "classifier": _classifier, "reward": _reward}


def _first_log(trainer) -> dict:
    trainer.train()
    return next(entry for entry in trainer.state.log_history if "loss" in entry)


@pytest.mark.parametrize("loop", LOOPS)
def test_router_loss_is_the_models_and_stays_out_of_evaluation(tmp_path, loop):
    weighted, plain = LOOPS[loop](tmp_path / "a", 0.5), LOOPS[loop](tmp_path / "b", 0.0)
    batch = weighted._prepare_inputs(next(iter(weighted.get_train_dataloader())))
    losses = {}
    for name, trainer in (("weighted", weighted), ("plain", plain)):
        trainer.model.train()
        losses[name] = trainer.compute_loss(trainer.model, dict(batch))
    # the model's own router loss for the policy's forward of this batch (DPO: chosen and rejected concatenated)
    forward = {key: batch[key] for key in ("input_ids", "attention_mask")}
    expected = weighted.model(**forward, output_router_logits=True).aux_loss.detach()
    torch.testing.assert_close(weighted._aux_window[-1], expected, rtol=1e-5, atol=1e-6)
    # one micro-batch outside `train()`: no accumulation to scale for (the logged test above covers it)
    torch.testing.assert_close(losses["weighted"] - losses["plain"], 0.5 * expected, rtol=1e-4, atol=1e-6)
    weighted.model.eval()
    with torch.no_grad():
        evaluation = weighted.compute_loss(weighted.model, dict(batch))
    torch.testing.assert_close(evaluation, losses["plain"].detach(), rtol=1e-5, atol=1e-6)


def test_our_lm_head_scores_as_trls_fused_head(tmp_path):
    """Log-probabilities and TRL's metrics from our head equal those of TRL's own fused kernel."""
    ours = _dpo(tmp_path / "ours", 0.0)
    model = _model(JetMoeForCausalLM, 0.0)
    args = DPOConfig(str(tmp_path / "trl"), max_length=48, gradient_checkpointing=False, **COMMON)
    theirs = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval(),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=load_tokenizer(),
    )
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    results = []
    for trainer in (ours, theirs):
        with torch.no_grad():  # move the policy away from the reference
            for parameter in trainer.model.parameters():
                parameter.add_(1e-3)
        trainer.model.train()
        trainer.compute_loss(trainer.model, dict(batch))
        results.append({key: values[-1] for key, values in trainer._metrics["train"].items()})
    for key in ("logps/chosen", "logps/rejected", "entropy", "logits/chosen", "logits/rejected"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-5, abs=1e-6), key
    for key in ("rewards/chosen", "rewards/rejected"):  # beta x differences of sums of ~70 nats
        assert results[0][key] == pytest.approx(results[1][key], abs=5e-4), key
    assert abs(results[0]["rewards/chosen"]) > 5e-3


# ---------------------------------------------------------------------------------------------
# KTO, ORPO and SimPO (appended with their loops)


def _kto(tmp_path, coef):
    model = _model(JetMoeForCausalLM, coef)
    args = KTOConfig(str(tmp_path), max_length=48, bf16=False, gradient_checkpointing=False, **COMMON)
    return JetMoeKTOTrainer(
        model=model,
        ref_model=copy.deepcopy(model).eval(),
        args=args,
        train_dataset=unpair(Dataset.from_list(PAIRS)),
        processing_class=load_tokenizer(),
    )


def _orpo(tmp_path, coef):
    args = ORPOConfig(str(tmp_path), max_length=48, bf16=False, gradient_checkpointing=False, **COMMON)
    return JetMoeORPOTrainer(
        model=_model(JetMoeForCausalLM, coef),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=load_tokenizer(),
    )


def _simpo(tmp_path, coef):
    args = CPOConfig(
        str(tmp_path),
        max_length=48,
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=2.0,
        simpo_gamma=1.0,
        bf16=False,
        gradient_checkpointing=False,
        **COMMON,
    )
    return JetMoeSimPOTrainer(
        model=_model(JetMoeForCausalLM, coef),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=load_tokenizer(),
    )


LOOPS["kto"] = _kto  # the batch holds `input_ids`: the generic tests above cover it
REFERENCE_FREE_LOOPS = {"orpo": _orpo, "simpo": _simpo}


@pytest.mark.parametrize("loop", {**LOOPS, **REFERENCE_FREE_LOOPS})
def test_logged_loss_carries_the_router_loss_once(tmp_path, loop):
    """Two accumulated micro-batches: logged loss(coef) - logged loss(0) = coef x logged aux_loss."""
    coef = 0.5
    weighted = _first_log({**LOOPS, **REFERENCE_FREE_LOOPS}[loop](tmp_path / "weighted", coef))
    plain = _first_log({**LOOPS, **REFERENCE_FREE_LOOPS}[loop](tmp_path / "plain", 0.0))
    assert weighted["aux_loss"] > 0 and weighted["aux_loss"] == pytest.approx(plain["aux_loss"], rel=1e-5)
    assert weighted["loss"] - plain["loss"] == pytest.approx(coef * weighted["aux_loss"], rel=1e-3, abs=1e-5)
    assert "routing/layer1.moe.entropy" in weighted
    if loop in ("sft", "classifier"):  # drift from the start model on a fixed probe batch of training rows
        assert (
            0.0 <= weighted["routing/layer1.moe.topk_kept"] <= 1.0
            and weighted["routing/layer0.moa.kl"] >= 0.0
        )


@pytest.mark.parametrize("loop", REFERENCE_FREE_LOOPS)
def test_reference_free_router_loss_is_the_models_and_stays_out_of_evaluation(tmp_path, loop):
    weighted, plain = (
        REFERENCE_FREE_LOOPS[loop](tmp_path / "a", 0.5),
        REFERENCE_FREE_LOOPS[loop](tmp_path / "b", 0.0),
    )
    batch = weighted._prepare_inputs(next(iter(weighted.get_train_dataloader())))
    losses = {}
    for name, trainer in (("weighted", weighted), ("plain", plain)):
        trainer.model.train()
        losses[name] = trainer.compute_loss(trainer.model, dict(batch))
    # the policy's one forward: chosen and rejected concatenated, as TRL's `concatenated_forward` builds it
    joined = weighted.concatenated_inputs(batch, padding_value=weighted.processing_class.pad_token_id)
    forward = {
        "input_ids": joined["concatenated_input_ids"],
        "attention_mask": joined["concatenated_attention_mask"],
    }
    expected = weighted.model(**forward, output_router_logits=True).aux_loss.detach()
    assert len(weighted._aux_window) == 1
    torch.testing.assert_close(weighted._aux_window[-1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["weighted"] - losses["plain"], 0.5 * expected, rtol=1e-4, atol=1e-6)
    weighted.model.eval()
    with torch.no_grad():
        evaluation = weighted.compute_loss(weighted.model, dict(batch))
    torch.testing.assert_close(evaluation, losses["plain"].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loop", ["sft", "dpo"])
def test_chunked_and_plain_lm_heads_give_the_same_loss_and_gradients(tmp_path, loop):
    """`chunked_lm_head: false` (plain logits of the scored positions, also the path of a LoRA-wrapped head)
    trains exactly as the chunked head does."""
    from types import SimpleNamespace

    results = []
    for chunked in (True, False):
        trainer = LOOPS[loop](tmp_path / str(chunked), 0.0)
        trainer.args.jetmoe = SimpleNamespace(chunked_lm_head=chunked, lm_head_chunk_size=7)
        trainer._lm_heads_installed = False
        policy = trainer.model
        policy.forward = policy.forward.__wrapped__  # TRL's fused forward, wrapped again with these options
        trainer.install_lm_heads()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (chunked_loss, chunked_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-5, atol=1e-6)
    # the head is tied to the input embeddings: its gradient is the embeddings'
    assert chunked_grads.keys() == plain_grads.keys() and "model.embed_tokens.weight" in chunked_grads
    for name in chunked_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
