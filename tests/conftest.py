import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from jetmoe_ft import JetMoeConfig  # noqa: E402

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_key_value_heads=2,
    kv_channels=16,
    intermediate_size=96,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
)


def tiny_kwargs(**overrides):
    """A small random JetMoE shape, for tests."""
    return {**TINY, **overrides}


def learnable_pairs(count: int, offset: int = 0) -> list[dict]:
    """A learnable preference, conversational: always answer politely (prompts numbered from `offset`)."""
    return [
        {
            "prompt": [{"role": "user", "content": f"Could you help me with task number {offset + i}?"}],
            "chosen": [{"role": "assistant", "content": "Yes, gladly."}],
            "rejected": [{"role": "assistant", "content": "No. Go away."}],
        }
        for i in range(count)
    ]


def randomize_biases(model: torch.nn.Module, seed: int = 1) -> None:
    """transformers initialises the MoA/MoE biases to zero; make them matter in parity tests."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


OURS_ONLY = ("moe_backend", "expert_row_multiple", "router_z_loss_coef", "router_loss_ignore_padding")


def reference_and_ours(reference_cls, ours_cls, seed: int = 0, **overrides):
    """transformers' model and ours with identical weights, both in eval mode."""
    ours_only = {key: overrides.pop(key) for key in OURS_ONLY if key in overrides}
    torch.manual_seed(seed)
    reference = reference_cls(transformers.JetMoeConfig(**tiny_kwargs(**overrides))).eval()
    randomize_biases(reference)
    ours = ours_cls(JetMoeConfig(**tiny_kwargs(**overrides, **ours_only))).eval()
    result = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return reference, ours


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
