"""QLoRA for JetMoE: 4-bit (bitsandbytes NF4/FP4) dense layers *and* experts.

Quantizing a JetMoE with transformers' `BitsAndBytesConfig` reaches only `nn.Linear` layers: `kv_proj`
and the routers (and bitsandbytes' CPU kernel rejects the routers' 8 outputs), while the experts, 90% of
the weights, stay in 16 bits. Here the dense projections (`kv_proj`) become bitsandbytes `Linear4bit`, and
every `JetMoeParallelExperts` becomes `JetMoeParallelExperts4bit`: each expert's `[out, in]` matrix is
quantized on its own (so it can be dequantized alone), and dequantized inside the dispatch — one expert
at a time by the loop backend and for the few unsorted rows of decoding, the whole layer at once for
`grouped_mm` — in the forward and again in the backward, so no 16-bit copy of a frozen expert outlives its
matmul. Routers, norms, biases and the head stay in 16 bits (they are small). Expert LoRA
(`jetmoe_ft.adapters.lora`) adds its trainable factors on top.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import grouped_mm
from ..modeling.experts import Routing, grouped_mm_supported
from ..modeling.modeling_jetmoe import JetMoeParallelExperts

QUANT_TYPES = ("nf4", "fp4")
DENSE_TARGETS = ("kv_proj",)
"""Dense `nn.Linear` layers that get 4 bits; routers, norms and heads stay in 16 bits."""


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as error:
        raise ImportError(
            "load_in_4bit needs bitsandbytes: `pip install bitsandbytes` (it has a CPU backend too)."
        ) from error
    return bitsandbytes


class JetMoeParallelExperts4bit(JetMoeParallelExperts):
    """`JetMoeParallelExperts` with frozen 4-bit weights, dequantized per expert inside the dispatch."""

    def __init__(
        self,
        experts: JetMoeParallelExperts,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        device: torch.device | str | None = None,
    ):
        nn.Module.__init__(self)
        bnb = _bnb()
        self.num_experts, self.input_size, self.output_size = (
            experts.num_experts,
            experts.input_size,
            experts.output_size,
        )
        self.backend = experts.backend
        self.compute_dtype = compute_dtype
        self.quant_type = quant_type
        packed, self.quant_states = [], []
        for expert in experts.weight.detach():
            data, state = bnb.functional.quantize_4bit(
                expert.to(device or expert.device, compute_dtype),
                blocksize=blocksize,
                compress_statistics=double_quant,
                quant_type=quant_type,
            )
            packed.append(data.flatten())
            self.quant_states.append(state)
        self.register_buffer("weight_4bit", torch.stack(packed))

    @property
    def weight(self) -> torch.Tensor:
        """The packed 4-bit data ([E, out·in/2] uint8): where PEFT looks for the layer's device."""
        return self.weight_4bit

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        for state in self.quant_states:
            state.to(self.weight_4bit.device)
        return module

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        """One expert's `[out, in]` weight, or all `[E, out, in]`, in the compute dtype."""
        functional = _bnb().functional
        experts = range(self.num_experts) if expert is None else [expert]
        shape = (self.output_size, self.input_size)
        weights = [
            functional.dequantize_4bit(self.weight_4bit[e].view(-1, 1), self.quant_states[e]).view(shape)
            for e in experts
        ]
        return weights[0] if expert is not None else torch.stack(weights)

    def forward(self, rows: torch.Tensor, routing: Routing) -> torch.Tensor:
        return _Dequantized4bitLinear.apply(rows, self, routing)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, 4-bit {self.quant_type}, compute {self.compute_dtype}"


def _expert_linear_4bit(
    rows: torch.Tensor, experts: JetMoeParallelExperts4bit, routing: Routing, transpose: bool
) -> torch.Tensor:
    """`rows[r] @ W_e.T` (or `@ W_e` with `transpose`) for every row r of expert e, W dequantized here."""
    dtype = experts.compute_dtype
    rows = rows.to(dtype)
    if not routing.grouped:  # few unsorted rows (decoding): dequantize only the experts they chose
        outputs = []
        for r, e in enumerate(routing.row_expert.tolist()):
            weight = experts.dequantize(e)
            outputs.append(rows[r : r + 1] @ weight if transpose else F.linear(rows[r : r + 1], weight))
        return torch.cat(outputs, dim=0)
    use_grouped = experts.backend != "loop" and grouped_mm_supported(
        experts.weight_4bit.new_empty((1, experts.output_size, experts.input_size), dtype=dtype), dtype
    )
    if use_grouped:
        weight = experts.dequantize()
        weight = weight.transpose(-2, -1).contiguous() if transpose else weight
        return grouped_mm(rows, weight.transpose(-2, -1), offs=routing.group_ends)
    ends = routing.group_ends.tolist()
    outputs = []
    for e, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        if end == start:
            outputs.append(rows.new_empty(0, experts.input_size if transpose else experts.output_size))
            continue
        weight = experts.dequantize(e)
        outputs.append(rows[start:end] @ weight if transpose else F.linear(rows[start:end], weight))
    return torch.cat(outputs, dim=0)


class _Dequantized4bitLinear(torch.autograd.Function):
    """Expert matmul on 4-bit weights; the backward dequantizes again instead of keeping 16-bit weights."""

    @staticmethod
    def forward(ctx, rows, experts, routing):
        ctx.experts, ctx.routing, ctx.input_dtype = experts, routing, rows.dtype
        # computed in the compute dtype, returned in the input's (as bitsandbytes' Linear4bit does): with fp32
        # activations (an fp32 recipe, or norms kept in fp32 for QLoRA) the queries match the fp32 keys/values
        return _expert_linear_4bit(rows, experts, routing, transpose=False).to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad_rows = _expert_linear_4bit(grad_output.contiguous(), ctx.experts, ctx.routing, transpose=True)
        return grad_rows.to(ctx.input_dtype), None, None


def quantize_model_4bit(
    model: nn.Module,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Put `model`'s experts and dense projections in 4 bits, in place, quantizing on `device` (default: where
    the weights are) and leaving the model there; everything else frozen, in 16 bits."""
    bnb = _bnb()
    if quant_type not in QUANT_TYPES:
        raise ValueError(
            f"bnb_4bit_quant_type: expected one of {', '.join(QUANT_TYPES)}, got {quant_type!r}."
        )
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, JetMoeParallelExperts) and not isinstance(child, JetMoeParallelExperts4bit):
                quantized = JetMoeParallelExperts4bit(
                    child, quant_type, double_quant, compute_dtype, device=device
                )
                setattr(module, child_name, quantized)
            elif isinstance(child, nn.Linear) and child_name in DENSE_TARGETS:
                quantized = _linear_4bit(bnb, child, quant_type, double_quant, compute_dtype, device)
                setattr(module, child_name, quantized)
    if device is not None:
        model.to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.is_loaded_in_4bit = True
    model.config.quantization = {"bits": 4, "quant_type": quant_type, "double_quant": double_quant}
    return model


def _linear_4bit(
    bnb, linear: nn.Linear, quant_type: str, double_quant: bool, compute_dtype, device
) -> nn.Module:
    """A bitsandbytes `Linear4bit` holding `linear`'s weight (quantized as it moves to its device)."""
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    quantized.weight = bnb.nn.Params4bit(
        linear.weight.data.to(compute_dtype),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    # On CPUs with AVX512-BF16, bitsandbytes repacks the weight for its inference kernel on the first forward in
    # evaluation mode (our evaluation before training) and keeps it: that kernel has no backward, so the gradient
    # through kv_proj to the layers below would be lost in training. QLoRA trains: keep the trainable layout.
    quantized.support_avx512bf16_for_cpu = False
    return quantized.to(device or linear.weight.device)
