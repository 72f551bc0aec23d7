"""Expert dispatch: lay out the (token, slot) pairs of one router as rows, then run every expert's matmul.

A router picks k experts for each of N tokens: N·k (token, slot) pairs. For many pairs, `sort_by_expert`
lays them out in one buffer of rows grouped by expert (each group optionally padded to a multiple of
`row_multiple` rows, so matmul shapes repeat between steps), without a host sync and with static shapes,
so the layer compiles into one graph. For few pairs (decoding, small batches) `route_rows` keeps them in
(token, slot) order, one row each, with no sort and no padding: sorting costs more than it saves there.
Each backend computes `rows_out[r] = weight[expert of r] @ rows_in[r]` with the same signature; the
loop is the reference the others are tested against.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..compat import grouped_mm


@dataclass
class ExpertRouting:
    """Where the N·k (token, slot) pairs of one router sit in the expert-sorted row buffer."""

    row_slot: torch.Tensor
    """[M] the (token·k + slot) pair held by each row; padding rows hold pair 0 and are never read."""
    slot_row: torch.Tensor
    """[N·k] the row of each (token, slot) pair."""
    group_ends: torch.Tensor
    """[E] int32, cumulative end row of each expert's group; the last one is M."""
    expert_counts: torch.Tensor
    """[E] number of (token, slot) pairs routed to each expert (padding not counted)."""
    top_k: int
    row_slot_or_end: torch.Tensor
    """[M] like `row_slot`, but padding rows hold N·k (one past the last pair): gradients skip them."""
    grouped: ClassVar[bool] = True

    @property
    def row_token(self) -> torch.Tensor:
        """[M] the token of each row."""
        return torch.div(self.row_slot, self.top_k, rounding_mode="floor")


def sort_by_expert(expert_index: torch.Tensor, num_experts: int, row_multiple: int = 1) -> ExpertRouting:
    """Group the (token, slot) pairs of `expert_index` [N, k] by expert, padding groups to `row_multiple`."""
    num_tokens, top_k = expert_index.shape
    flat_expert = expert_index.reshape(-1)
    num_slots = flat_expert.numel()
    order = torch.argsort(flat_expert, stable=True)  # pairs sorted by expert, token order kept inside
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_expert.device)
    counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
    if row_multiple > 1:
        padded_counts = (counts + row_multiple - 1) // row_multiple * row_multiple
        # A static upper bound on the padded total, itself a multiple, so every group stays a multiple.
        bound = num_slots + num_experts * (row_multiple - 1)
        num_rows = (bound + row_multiple - 1) // row_multiple * row_multiple
    else:
        padded_counts, num_rows = counts, num_slots
    group_ends = padded_counts.cumsum(0)
    sorted_expert = flat_expert[order]
    rank_in_group = (
        torch.arange(num_slots, device=flat_expert.device) - (counts.cumsum(0) - counts)[sorted_expert]
    )
    sorted_rows = (group_ends - padded_counts)[sorted_expert] + rank_in_group
    slot_row = torch.empty_like(order).scatter_(0, order, sorted_rows)
    if num_rows == num_slots:
        row_slot = row_slot_or_end = order
    else:
        row_slot_or_end = order.new_full((num_rows,), num_slots).scatter_(0, sorted_rows, order)
        row_slot = row_slot_or_end.masked_fill(row_slot_or_end == num_slots, 0)
    # The slack rows after the last real group join the last expert, so every row is computed (and finite).
    group_ends = torch.cat([group_ends[:-1], group_ends.new_full((1,), num_rows)]).to(torch.int32)
    return ExpertRouting(row_slot, slot_row, group_ends, counts, top_k, row_slot_or_end)


@dataclass
class RowRouting:
    """Few (token, slot) pairs as rows in their own order, one row each: no sort, no padding, no extra op."""

    row_expert: torch.Tensor
    """[N·k] the expert of each row (row r is token r // k, slot r % k)."""
    num_experts: int
    top_k: int
    grouped: ClassVar[bool] = False

    @property
    def expert_counts(self) -> torch.Tensor:
        """[E] number of (token, slot) pairs routed to each expert."""
        return torch.bincount(self.row_expert, minlength=self.num_experts)


Routing = ExpertRouting | RowRouting


def route_rows(expert_index: torch.Tensor, num_experts: int) -> RowRouting:
    """The (token, slot) pairs of `expert_index` [N, k] as rows in their own order."""
    return RowRouting(expert_index.reshape(-1), num_experts, expert_index.shape[1])


def few_rows(num_slots: int, num_experts: int) -> bool:
    """Whether `route_rows` beats sorting: at most one row per expert on average (decoding, small batches)."""
    return num_slots <= num_experts


class _GatherRows(torch.autograd.Function):
    """`source[index]` whose gradient is a gather too, `grad[inverse]` summed over each `group` of
    consecutive entries, where indexing's own backward zero-fills the source and scatter-adds into it.
    With `zero_row`, an `inverse` entry equal to len(grad) reads zero (padding rows)."""

    @staticmethod
    def forward(ctx, source, index, inverse, group: int, zero_row: bool):
        ctx.save_for_backward(inverse)
        ctx.group, ctx.zero_row = group, zero_row
        return source[index]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if ctx.zero_row:
            grad = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
        grad_source = grad[inverse]
        if ctx.group > 1:
            grad_source = grad_source.view(-1, ctx.group, *grad.shape[1:]).sum(1)
        return grad_source, None, None, None, None


def token_rows(tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[N, D] tokens -> [M, D] rows (each token once per chosen expert)."""
    if not routing.grouped:
        return tokens.repeat_interleave(routing.top_k, dim=0)
    return _GatherRows.apply(tokens, routing.row_token, routing.slot_row, routing.top_k, False)


def slot_rows(slots: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[N·k, D] (token, slot) pairs -> [M, D] rows."""
    if not routing.grouped:
        return slots
    return _GatherRows.apply(slots, routing.row_slot, routing.slot_row, 1, False)


def rows_to_slots(rows: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[M, D] rows -> [N·k, D] (token, slot) pairs; padding rows get no gradient."""
    if not routing.grouped:
        return rows
    padded = routing.row_slot_or_end.shape[0] != routing.slot_row.shape[0]
    return _GatherRows.apply(rows, routing.slot_row, routing.row_slot_or_end, 1, padded)


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype autocast would pick for a matmul on this tensor."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def loop_expert_linear(rows: torch.Tensor, weight: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
    """Reference backend: one `F.linear` per expert on its slice of rows (syncs with the host)."""
    ends = routing.group_ends.tolist()
    starts = [0, *ends[:-1]]
    outputs = [
        F.linear(rows[start:end], weight[e]) for e, (start, end) in enumerate(zip(starts, ends, strict=True))
    ]
    return torch.cat(outputs, dim=0)


@torch.library.custom_op("jetmoe_ft::grouped_linear", mutates_args=())
def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """`rows[r] @ weight[e].T` for the rows r of each expert group e, in one `torch._grouped_mm` call.

    A custom op so `torch.compile` treats it as one opaque call: the meta function of `_grouped_mm`
    accepts bf16 only (a CUDA rule), which would otherwise stop compiling fp32 models on the CPU.
    """
    return grouped_mm(rows, weight.transpose(-2, -1), offs=group_ends)


@grouped_linear.register_fake
def _(rows, weight, group_ends):
    return rows.new_empty(rows.shape[0], weight.shape[1])


@torch.library.custom_op("jetmoe_ft::grouped_linear_backward", mutates_args=())
def grouped_linear_backward(
    grad_output: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `grouped_linear` with respect to its rows and its `[E, out, in]` weight."""
    grad_rows = grouped_mm(grad_output, weight, offs=group_ends)
    grad_weight = grouped_mm(grad_output.t(), rows, offs=group_ends)
    # An expert with no rows gets no gradient; don't trust what the kernel left in its slice.
    group_sizes = torch.diff(group_ends, prepend=group_ends.new_zeros(1))
    grad_weight = torch.where((group_sizes > 0)[:, None, None], grad_weight, 0)
    return grad_rows, grad_weight


@grouped_linear_backward.register_fake
def _(grad_output, rows, weight, group_ends):
    return rows.new_empty(rows.shape), weight.new_empty(weight.shape)


def _grouped_linear_setup_context(ctx, inputs, output):
    rows, weight, group_ends = inputs
    ctx.save_for_backward(rows, weight, group_ends)


def _grouped_linear_backward(ctx, grad_output):
    rows, weight, group_ends = ctx.saved_tensors
    grad_rows, grad_weight = grouped_linear_backward(grad_output.contiguous(), rows, weight, group_ends)
    return grad_rows, grad_weight, None


grouped_linear.register_autograd(_grouped_linear_backward, setup_context=_grouped_linear_setup_context)


def grouped_mm_expert_linear(
    rows: torch.Tensor, weight: torch.Tensor, routing: ExpertRouting
) -> torch.Tensor:
    """All experts in one grouped matmul over the expert-sorted rows; no host sync."""
    dtype = compute_dtype(rows)
    rows, weight = rows.to(dtype), weight.to(dtype)
    if torch.compiler.is_compiling():
        return grouped_linear(rows, weight, routing.group_ends)
    # Eager: the op itself, with its own autograd, costs less per call than the custom-op wrapper.
    return grouped_mm(rows, weight.transpose(-2, -1), offs=routing.group_ends)


def rows_expert_linear(rows: torch.Tensor, weight: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Each row times its own expert's weight, reading only the chosen experts: for the few unsorted rows of
    `route_rows` (on grouped rows too, finding each row's expert from the groups)."""
    if routing.grouped:
        positions = torch.arange(rows.shape[0], device=rows.device, dtype=torch.int32)
        row_expert = torch.searchsorted(routing.group_ends, positions, right=True)
    else:
        row_expert = routing.row_expert
    if torch.compiler.is_compiling():
        # One fused gather-multiply-reduce kernel: a gathered copy of the weights would triple the bytes read.
        dtype = compute_dtype(rows)
        return (weight[row_expert].to(dtype) * rows.to(dtype)[:, None, :]).sum(-1)
    experts = row_expert.tolist()
    return torch.cat([F.linear(rows[r : r + 1], weight[e]) for r, e in enumerate(experts)])


ExpertLinear = Callable[[torch.Tensor, torch.Tensor, Routing], torch.Tensor]

EXPERT_BACKENDS: dict[str, ExpertLinear] = {
    "loop": loop_expert_linear,
    "grouped_mm": grouped_mm_expert_linear,
    "rows": rows_expert_linear,
}


def grouped_mm_supported(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs on this weight: fp32/bf16/fp16 on CPU, bf16 on CUDA SM >= 8.0,
    and row strides of both operands a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = weight.device
    if device.type == "cpu":
        dtype_ok = dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif device.type == "cuda":
        dtype_ok = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 8
    else:
        dtype_ok = False
    itemsize = torch.empty((), dtype=dtype).element_size()
    _, out_features, in_features = weight.shape
    return dtype_ok and (in_features * itemsize) % 16 == 0 and (out_features * itemsize) % 16 == 0


def resolve_backend(
    name: str, weight: torch.Tensor, dtype: torch.dtype, routing: Routing | None = None
) -> ExpertLinear:
    """The expert matmul for `moe_backend=name` and this call's `routing`: unsorted rows take the rows
    backend; otherwise `auto` takes grouped_mm where it runs, else the loop."""
    if routing is not None and not routing.grouped:
        return rows_expert_linear
    if name == "auto":
        name = "grouped_mm" if grouped_mm_supported(weight, dtype) else "loop"
    return EXPERT_BACKENDS[name]


def default_row_multiple(device: torch.device, dtype: torch.dtype, num_slots: int, num_experts: int) -> int:
    """Row padding per expert group: 64 for half precision on CPU, where oneDNN re-plans a matmul for every
    new row count, when the padding costs at most a quarter more rows (never while decoding); else none."""
    multiple = 64
    if (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and num_slots >= 4 * num_experts * multiple
    ):
        return multiple
    return 1
