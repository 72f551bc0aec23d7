"""CPU benchmark of our JetMoE against transformers' JetMoe, with the same weights.

Run from the repository root (this is `make bench`):

    .venv/bin/python bench/bench_model.py                   # every default case, ~17 min on 2 cores
    .venv/bin/python bench/bench_model.py --quick           # small config only, fewer steps
    .venv/bin/python bench/bench_model.py --cases 'train-small-*,decode-*'

Cases (`--list` prints them all):

- `train-{small,medium}-{fp32,bf16}`: one training step (forward with labels, backward, AdamW step) of
  ours, of transformers' `JetMoeForCausalLM` loaded with the same state dict ("ref"), and of a dense
  `LlamaForCausalLM` with the same active FLOPs per token ("dense"). bf16 means
  `torch.autocast("cpu", dtype=torch.bfloat16)` around the forward, weights kept in fp32.
- `ckpt-{small,medium}-fp32`: our training step with gradient checkpointing against without it.
- `lora-{small,medium}-{fp32,bf16}`: a training step of rank-16 LoRA on every MoA and MoE expert and on
  kv_proj, two ways: our expert LoRA ("lora": per-expert factors applied inside the sorted dispatch) and PEFT's
  own `target_parameters` on the same expert weights ("peft-params": builds every expert's full delta each
  forward), against full fine-tuning of ours ("ours").
- `decode-{small,medium}-{fp32,bf16}-b{1,16}`: greedy `generate()` of 64 new tokens after a batch x 32 prompt,
  with a KV cache, three ways: ours eager ("ours", dynamic cache), ours with transformers' static cache and a
  `torch.compile`d forward ("compiled": inductor, fullgraph, compiled in the warm-up rounds), transformers'
  eager ("ref"). bf16 here means the model's weights in bf16 (how one decodes; autocast would cast every
  weight on every step). Checks that the three produce the same tokens (fp32; in bf16 the summation order
  may flip a near-tie, so the share of agreeing tokens is reported instead).

Throughput is measured with each implementation in its own process, steps interleaved in time: every variant
of a config (implementation x dtype, "contender") lives in a persistent worker process of its own (started
with multiprocessing's `spawn`), which builds its model (ours is loaded with the state dict of a seeded
reference, so ours and ref start from the same weights) and then waits on a pipe. The parent drives rounds:
it asks each contender in turn (the order reversed every other round) for one step and waits for the step
time, measured inside the worker with `time.perf_counter()` around the step. Only one worker computes at a
time, the others sleep on their pipe, so they do not compete for the cores; and no two models share a
heap, which would distort the comparison (big models and their multi-GB step buffers in one process slow
each other through the allocator and page faults). The training contenders of one size and dtype form one
rotation (the bf16 one also runs ours in fp32, for the bf16 / fp32 ratio), so that at most four workers,
each holding its model, optimizer state and leftover heap, are alive at once; decode is one rotation of
ours, compiled and ref. The reported time is the median of the timed steps after the warm-up steps. tokens/s =
batch x sequence length / median step time (decode: new tokens / median `generate()` time, prefill
included). Every `ratio` is ours / the other, so > 1 means ours is faster.

Peak memory is measured in a fresh subprocess per (case, implementation): `*_peak_rss_mb` is the peak
resident set size of that whole process (Python, torch, model, optimizer and the steps; model building is left
out, since "ours" is loaded from a reference built first), and `*_step_rss_growth_mb` the largest rise of
the peak RSS during one step over the RSS just before it (the peak is reset through /proc/self/clear_refs,
where Linux allows it). One warm-up step precedes the measured one, so the optimizer state is in the baseline.

Timings only mean something on an otherwise idle machine: every record carries `other_procs_cpu_cores`,
the cores other processes kept busy during the timed rounds (from /proc/stat, less the CPU time of this
process and of its contender workers, from /proc/<pid>/stat), and the summary flags cases where that exceeded
a quarter of a core. `*_first_loss` is the loss of the first (untimed) step, from the same
weights and batch, as a parity check.

Every case prints one JSON line to stdout; all lines go to bench/results/model.jsonl and a Markdown
summary to bench/results/model.md (and to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import fnmatch
import gc
import json
import multiprocessing
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import transformers

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM
from jetmoe_ft.adapters.lora import register_expert_lora
from jetmoe_ft.modeling.modeling_jetmoe import JetMoeParallelExperts

SEED = 1234
RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMPLEMENTATIONS = ("ours", "ref", "dense")
LORA_IMPLEMENTATIONS = ("ours", "lora", "peft-params")
LORA_RANK = 16
DTYPES = ("fp32", "bf16")
BIAS_INIT_STD = 0.02
LEARNING_RATE = 1e-4

MODEL_SIZES: dict[str, dict] = {
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_key_value_heads=4,
        kv_channels=32,
        intermediate_size=512,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
    ),
    "medium": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_key_value_heads=4,
        kv_channels=64,
        intermediate_size=1024,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
    ),
}
TRAIN_BATCH = {"small": (8, 256), "medium": (4, 1024)}
DECODE_PROMPT_LEN = 32
DECODE_NEW_TOKENS = 64
DECODE_BATCHES = (1, 16)
DECODE_IMPLEMENTATIONS = ("ours", "compiled", "ref")
WORKER_TIMEOUT_S = 1200  # the longest a contender worker may take to build its model or to take one step


# ----------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One benchmark case: what is measured (`kind`), on which model size, in which compute dtype."""

    kind: str  # "train", "ckpt", "lora" or "decode"
    size: str
    dtype: str
    batch: int = 1  # decode only

    @property
    def name(self) -> str:
        suffix = f"-b{self.batch}" if self.kind == "decode" else ""
        return f"{self.kind}-{self.size}-{self.dtype}{suffix}"


ALL_CASES = (
    [Case("train", size, dtype) for size in MODEL_SIZES for dtype in DTYPES]
    + [Case("ckpt", size, "fp32") for size in MODEL_SIZES]
    + [Case("lora", size, dtype) for size in MODEL_SIZES for dtype in DTYPES]
    + [
        Case("decode", size, dtype, batch)
        for size in MODEL_SIZES
        for batch in DECODE_BATCHES
        for dtype in DTYPES
    ]
)
DEFAULT_CASES = (
    "train-small-fp32",
    "train-small-bf16",
    "train-medium-fp32",
    "train-medium-bf16",
    "ckpt-medium-fp32",
    "lora-small-fp32",
    "lora-medium-fp32",
    "lora-medium-bf16",
    *(f"decode-{size}-{dtype}-b{batch}" for size in MODEL_SIZES for batch in (1, 16) for dtype in DTYPES),
)
QUICK_CASES = (
    "train-small-fp32",
    "train-small-bf16",
    "ckpt-small-fp32",
    "lora-small-fp32",
    "decode-small-fp32-b1",
)


def select_cases(patterns: str | None, quick: bool) -> list[Case]:
    """The cases matching the comma-separated glob `patterns`, else the default (or quick) set."""
    if not patterns:
        names = QUICK_CASES if quick else DEFAULT_CASES
        return [case for case in ALL_CASES if case.name in names]
    globs = [pattern.strip() for pattern in patterns.split(",") if pattern.strip()]
    selected = [case for case in ALL_CASES if any(fnmatch.fnmatch(case.name, glob) for glob in globs)]
    if not selected:
        known = ", ".join(case.name for case in ALL_CASES)
        raise SystemExit(f"--cases {patterns!r} matches no case; known cases: {known}")
    return selected


# ----------------------------------------------------------------------------------------------- setup


def log(message: str) -> None:
    """Progress on stderr, so stdout stays one JSON line per case."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


THREADS_ENV = "JETMOE_BENCH_THREADS"  # set by --threads; inherited by the worker processes


def configure_process() -> None:
    """All cores (or --threads) for torch, quiet transformers, deterministic seeds."""
    torch.set_num_threads(int(os.environ.get(THREADS_ENV) or os.cpu_count() or 1))
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    transformers.set_seed(SEED)


def environment() -> dict:
    """Versions and machine facts stored with every result."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


# ---------------------------------------------------------------------------------------------- models


def reference_config(size: str, use_cache: bool) -> transformers.JetMoeConfig:
    """transformers' JetMoe config for `size`, SDPA attention."""
    return transformers.JetMoeConfig(**MODEL_SIZES[size], use_cache=use_cache, attn_implementation="sdpa")


def build_reference(size: str, use_cache: bool) -> transformers.JetMoeForCausalLM:
    """transformers' JetMoe, seeded, with non-zero biases (they are zero-initialised) so they matter."""
    transformers.set_seed(SEED)
    model = transformers.JetMoeForCausalLM(reference_config(size, use_cache))
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * BIAS_INIT_STD)
    return model


def build_ours(reference: torch.nn.Module, size: str, use_cache: bool) -> JetMoeForCausalLM:
    """Our JetMoE with the reference's weights, SDPA attention, default (`auto`) expert backend."""
    config = JetMoeConfig(**MODEL_SIZES[size], use_cache=use_cache, attn_implementation="sdpa")
    model = JetMoeForCausalLM(config)
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


def build_dense(size: str, use_cache: bool) -> transformers.LlamaForCausalLM:
    """A dense Llama with JetMoE's active FLOPs per token: k experts' worth of MLP width and query heads."""
    sizes = MODEL_SIZES[size]
    top_k = sizes["num_experts_per_tok"]
    config = transformers.LlamaConfig(
        vocab_size=sizes["vocab_size"],
        hidden_size=sizes["hidden_size"],
        intermediate_size=top_k * sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=top_k * sizes["num_key_value_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        head_dim=sizes["kv_channels"],
        tie_word_embeddings=True,  # as JetMoE
        use_cache=use_cache,
        attn_implementation="sdpa",
    )
    transformers.set_seed(SEED)
    return transformers.LlamaForCausalLM(config)


def build_adapted(model: JetMoeForCausalLM, impl: str) -> torch.nn.Module:
    """Rank-16 LoRA on every expert projection and kv_proj: ours ("lora") or PEFT `target_parameters`."""
    from peft import LoraConfig, get_peft_model

    experts = [name for name, module in model.named_modules() if isinstance(module, JetMoeParallelExperts)]
    if impl == "lora":
        config = register_expert_lora(
            LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=[*experts, "kv_proj"])
        )
    else:
        config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=2 * LORA_RANK,
            target_modules=["kv_proj"],
            target_parameters=[f"{name}.weight" for name in experts],
        )
    return get_peft_model(model, config)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient (activation) checkpointing on every decoder layer, non-reentrant."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def build_models(implementations: set[str], size: str, use_cache: bool) -> dict[str, torch.nn.Module]:
    """The requested implementations ("ours", "ours-ckpt", "ref", "dense") of one size, same JetMoE weights."""
    models: dict[str, torch.nn.Module] = {}
    reference = build_reference(size, use_cache)
    for name in sorted(implementations):
        if name in ("ours", "ours-ckpt"):
            models[name] = build_ours(reference, size, use_cache)
            if name == "ours-ckpt":
                enable_checkpointing(models[name])
        elif name in ("lora", "peft-params"):
            models[name] = build_adapted(build_ours(reference, size, use_cache), name)
        elif name == "dense":
            models[name] = build_dense(size, use_cache)
    if "ref" in implementations:
        models["ref"] = reference
    del reference
    gc.collect()
    for name, model in models.items():
        if model.config._attn_implementation != "sdpa":
            raise RuntimeError(f"{name} runs {model.config._attn_implementation} attention, not sdpa")
    return models


def token_batch(size: str, shape: tuple[int, int]) -> torch.Tensor:
    """Seeded random token ids of `shape`, avoiding the special ids 0-2."""
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(3, MODEL_SIZES[size]["vocab_size"], shape, generator=generator)


# ----------------------------------------------------------------------------------------------- steps


def training_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, dtype: str
) -> float:
    """Forward with labels (under bf16 autocast for `bf16`), backward, AdamW step; returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, **kwargs) -> torch.Tensor:
    """Exactly `DECODE_NEW_TOKENS` greedy tokens after `prompt`, with the KV cache."""
    with torch.inference_mode():
        output = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=DECODE_NEW_TOKENS,
            min_new_tokens=DECODE_NEW_TOKENS,
            do_sample=False,
            use_cache=True,
            pad_token_id=model.config.eos_token_id,
            **kwargs,
        )
    return output[:, prompt.shape[1] :]


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Plain AdamW, the same for every implementation."""
    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)


def make_step(spec: dict) -> Callable[[], object]:
    """Build one implementation (`spec`: kind "train" or "decode", size, dtype, impl) and return its step:
    a training step (returning the loss) or a greedy decode (returning the new tokens)."""
    kind, size, dtype, impl = spec["kind"], spec["size"], spec["dtype"], spec["impl"]
    decode = kind == "decode"
    models = build_models({"ours" if impl == "compiled" else impl}, size, use_cache=decode)
    model = models.popitem()[1]
    del models
    gc.collect()
    if decode:
        model.eval()
        if dtype == "bf16":
            model.to(torch.bfloat16)
        prompt = token_batch(size, (spec.get("batch", 1), DECODE_PROMPT_LEN))
        if impl == "compiled":
            model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
            return lambda: greedy_decode(model, prompt, cache_implementation="static")
        return lambda: greedy_decode(model, prompt)
    model.train()
    optimizer = make_optimizer(model)
    batch = token_batch(size, TRAIN_BATCH[size])
    return lambda: training_step(model, optimizer, batch, dtype)


# ------------------------------------------------------------------------------------- interleaved timing


def contender_worker(conn: Connection, spec: dict) -> None:
    """A contender's persistent process: build its model, then take one step per "step" command on `conn`.

    Replies ("ready", info) once built, then ("ok", step seconds, output, RSS MiB) per step, or ("error",
    traceback) once, after which it exits. It exits on "stop" and when the parent's end of the pipe closes.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the workers
    try:
        try:
            configure_process()
            step = make_step(spec)
            release_free_memory()
        except Exception:
            conn.send(("error", traceback.format_exc()))
            return
        conn.send(("ready", {"threads": torch.get_num_threads(), "rss_mb": current_rss_mb()}))
        while conn.recv() == "step":
            try:
                start = time.perf_counter()
                output = step()
                elapsed = time.perf_counter() - start
            except Exception:
                conn.send(("error", traceback.format_exc()))
                return
            if isinstance(output, torch.Tensor):
                output = output.tolist()  # plain data through the pipe, no shared-memory tensors
            conn.send(("ok", elapsed, output, current_rss_mb()))
    except (EOFError, OSError):  # the parent is gone
        return
    finally:
        conn.close()


class WorkerError(RuntimeError):
    """A contender worker failed, died or did not answer in time."""


def _process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (all its threads) so far, from /proc; None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (IndexError, ValueError):
        return None


@dataclass
class Contender:
    """One variant in the rotation, run by its own worker process: what it builds and what it measured."""

    label: str
    spec: dict  # for make_step(): kind, size, dtype, impl
    times: list[float] = field(default_factory=list)
    outputs: list = field(default_factory=list)
    error: str | None = None
    process: multiprocessing.process.BaseProcess | None = field(default=None, repr=False)
    conn: Connection | None = field(default=None, repr=False)
    busy: bool = False  # a command was sent and its reply not yet received
    rss_mb: float | None = None  # the worker's RSS after its last step
    cpu_s: float | None = None  # the worker's CPU seconds when last looked at

    def median_s(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def start(self, context) -> None:
        """Start the worker, which builds the model; `wait_ready` waits for it."""
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=contender_worker, args=(child_conn, self.spec), name=f"bench-{self.label}", daemon=True
        )
        self.process.start()
        child_conn.close()
        self.busy = True

    def _reply(self, timeout_s: float) -> tuple:
        """The worker's next reply; raises WorkerError when it died, failed or took longer than `timeout_s`."""
        try:
            if not self.conn.poll(timeout_s):
                raise WorkerError(f"{self.label}: no reply from its worker within {timeout_s:.0f}s")
            reply = self.conn.recv()
        except (EOFError, OSError) as error:
            self.process.join(5)
            raise WorkerError(
                f"{self.label}: its worker died (exit code {self.process.exitcode}): {error!r}"
            ) from None
        self.busy = False
        self.cpu_seconds()
        if reply[0] == "error":
            raise WorkerError(f"{self.label} failed in its worker:\n{reply[1]}")
        return reply

    def wait_ready(self, timeout_s: float = WORKER_TIMEOUT_S) -> None:
        """Wait until the worker has built its model; records the error when it could not."""
        try:
            _, info = self._reply(timeout_s)
        except WorkerError as error:
            self.fail(str(error))
            return
        log(
            f"{self.label}: worker {self.process.pid} ready, {info['threads']} threads, {info['rss_mb']:,.0f} MiB"
        )

    def step(self, timeout_s: float = WORKER_TIMEOUT_S) -> tuple[float, object]:
        """One step in the worker: (seconds it took, measured in the worker, its output)."""
        try:
            self.conn.send("step")
        except OSError as error:
            raise WorkerError(f"{self.label}: its worker is gone: {error!r}") from None
        self.busy = True
        _, elapsed, output, self.rss_mb = self._reply(timeout_s)
        return elapsed, output

    def fail(self, error: str) -> None:
        """Record `error` and stop the worker."""
        self.error = error
        log(error)
        self.stop()

    def cpu_seconds(self) -> float | None:
        """The worker's CPU seconds so far (the last value read, once it has exited)."""
        if self.process is not None and self.process.pid is not None:
            now = _process_cpu_seconds(self.process.pid)
            if now is not None:
                self.cpu_s = now
        return self.cpu_s

    def stop(self) -> None:
        """Stop the worker: ask an idle one to exit, terminate a busy or unresponsive one, kill as a last resort."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.is_alive() and not self.busy:
            with contextlib.suppress(OSError):
                self.conn.send("stop")
            process.join(10)
        if process.is_alive():
            process.terminate()
            process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
        self.conn.close()
        self.busy = False


@contextlib.contextmanager
def running_workers(contenders: list[Contender]):
    """Start one worker per contender (building concurrently), wait until all are ready; always stop them."""
    context = multiprocessing.get_context("spawn")
    try:
        for contender in contenders:
            contender.start(context)
        for contender in contenders:
            contender.wait_ready()
        yield contenders
    finally:
        for contender in contenders:
            contender.stop()


def _machine_busy_seconds() -> float | None:
    """CPU seconds busy on the whole machine so far, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ContentionMonitor:
    """How many cores other processes kept busy while we measured: a noisy neighbour skews every timing.

    "Other" excludes this process and the contenders' workers (idle ones sleep on their pipe, using ~0).
    """

    def __init__(self, contenders: list[Contender] = ()):
        self.contenders = list(contenders)
        self.start, self.own_start = _machine_busy_seconds(), self._own_seconds()
        self.wall = time.perf_counter()

    def _own_seconds(self) -> float:
        """CPU seconds of this process and of every contender worker so far."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        workers = sum(contender.cpu_seconds() or 0.0 for contender in self.contenders)
        return usage.ru_utime + usage.ru_stime + workers

    def other_cores(self) -> float | None:
        """Average number of cores used by other processes since construction."""
        end, own, wall = _machine_busy_seconds(), self._own_seconds(), time.perf_counter() - self.wall
        if self.start is None or end is None or wall <= 0:
            return None
        return max(0.0, (end - self.start - (own - self.own_start)) / wall)


def run_interleaved(contenders: list[Contender], warmup: int, steps: int) -> float | None:
    """Every contender's worker takes one step in turn, reversed every other round; the first `warmup` rounds
    are untimed. The workers must be running (`running_workers`).

    Returns the average number of cores other processes used during the timed rounds.
    """
    monitor = ContentionMonitor(contenders)
    for round_index in range(warmup + steps):
        if round_index == warmup:
            monitor = ContentionMonitor(contenders)
        order = contenders if round_index % 2 == 0 else contenders[::-1]
        for contender in order:
            if contender.error:
                continue
            try:
                elapsed, output = contender.step()
            except WorkerError as error:
                contender.fail(str(error))
                continue
            contender.outputs.append(output)
            if round_index >= warmup:
                contender.times.append(elapsed)
        if round_index == 0:
            held = {c.label: c.rss_mb for c in contenders if c.rss_mb is not None}
            each = ", ".join(f"{label} {rss:,.0f}" for label, rss in held.items())
            log(f"RSS of the workers between steps: {sum(held.values()):,.0f} MiB ({each})")
        timed = "warm-up" if round_index < warmup else "timed"
        summary = ", ".join(
            f"{c.label} {c.times[-1]:.2f}s" for c in contenders if c.times and round_index >= warmup
        )
        log(f"round {round_index + 1}/{warmup + steps} ({timed}) {summary}")
    other = monitor.other_cores()
    if other is not None and other > 0.25:
        log(f"warning: other processes kept {other:.2f} cores busy during the timed rounds")
    return other


# ---------------------------------------------------------------------------------------------- memory


def _proc_status_mb(field_name: str) -> float | None:
    """A `VmRSS`/`VmHWM` line of /proc/self/status in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (since the last reset), in MiB."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (the peak where the current value is unavailable)."""
    rss = _proc_status_mb("VmRSS")
    return rss if rss is not None else peak_rss_mb()


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS counts live memory only."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def memory_worker(spec: dict) -> dict:
    """In a fresh process: build one implementation, run warm-up steps, then measure the peak RSS per step."""
    configure_process()
    step = make_step(spec)
    release_free_memory()
    model_rss = current_rss_mb()
    reset_peak_rss()  # "ours" is built from a reference model, which is gone now: leave its peak out
    for _ in range(spec["warmup"]):
        step()
    overall_peak = peak_rss_mb()
    growths, reset_ok = [], True
    for _ in range(spec["steps"]):
        release_free_memory()
        before = current_rss_mb()
        reset_ok = reset_peak_rss() and reset_ok
        step()
        peak = peak_rss_mb()
        growths.append(peak - before)
        overall_peak = max(overall_peak, peak)
    return {
        "peak_rss_mb": round(overall_peak, 1),
        "step_rss_growth_mb": round(max(growths), 1),
        "model_rss_mb": round(model_rss, 1),
        "peak_reset_per_step": reset_ok,
    }


def measure_memory(spec: dict, timeout_s: float = 1200) -> dict:
    """Run `memory_worker(spec)` in a fresh subprocess of this file; its result, or the error it hit."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"memory worker timed out after {timeout_s}s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"memory worker exited {done.returncode}: {done.stderr.strip()[-3000:]}"}
    return json.loads(lines[-1])


class MemoryCache:
    """Subprocess memory measurements, each run once per (kind, size, dtype, impl) in a run of the benchmark."""

    def __init__(self, enabled: bool, warmup: int, steps: int):
        self.enabled, self.warmup, self.steps = enabled, warmup, steps
        self.results: dict[tuple, dict] = {}

    def get(self, kind: str, size: str, dtype: str, impl: str, batch: int = 1) -> dict:
        """The peak-RSS measurement of one implementation, measured on first request."""
        if not self.enabled:
            return {}
        worker_kind = "decode" if kind == "decode" else "train"
        key = (worker_kind, size, dtype, impl, batch)
        if key not in self.results:
            log(f"memory: {worker_kind}-{size}-{dtype} {impl} in a fresh subprocess")
            spec = {"kind": worker_kind, "size": size, "dtype": dtype, "impl": impl, "batch": batch}
            self.results[key] = measure_memory({**spec, "warmup": self.warmup, "steps": self.steps})
            if "error" in self.results[key]:
                log(f"memory worker failed: {self.results[key]['error']}")
        return self.results[key]


# ---------------------------------------------------------------------------------------- case results


def tokens_per_s(contender: Contender | None, tokens: int) -> float | None:
    """Throughput of a contender from its median step time."""
    if contender is None or contender.median_s() is None:
        return None
    return tokens / contender.median_s()


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def rounded(record: dict) -> dict:
    """Floats to 6 significant digits, lists of floats (step times) to milliseconds, for readable JSON."""
    out = {}
    for key, value in record.items():
        if isinstance(value, float):
            out[key] = float(f"{value:.6g}")
        elif isinstance(value, list) and value and all(isinstance(v, float) for v in value):
            out[key] = [round(v, 3) for v in value]
        else:
            out[key] = value
    return out


def memory_fields(prefix: str, memory: dict) -> dict:
    """`{prefix}_peak_rss_mb`, `{prefix}_step_rss_growth_mb` (and an error) from one memory measurement."""
    fields = {}
    if "peak_rss_mb" in memory:
        fields[f"{prefix}_peak_rss_mb"] = memory["peak_rss_mb"]
        fields[f"{prefix}_step_rss_growth_mb"] = memory["step_rss_growth_mb"]
    if "error" in memory:
        fields[f"{prefix}_memory_error"] = memory["error"]
    return fields


def contender_fields(prefix: str, contender: Contender | None, tokens: int) -> dict:
    """Throughput, step times and any error of one contender, under `prefix`."""
    if contender is None:
        return {}
    fields = {
        f"{prefix}_tok_s": tokens_per_s(contender, tokens),
        f"{prefix}_median_s": contender.median_s(),
        f"{prefix}_step_s": contender.times,
    }
    if contender.error:
        fields[f"{prefix}_error"] = contender.error
    return fields


def first_loss(contender: Contender | None) -> float | None:
    """The loss of a contender's first (warm-up) step, as a parity check."""
    return contender.outputs[0] if contender and contender.outputs else None


# ------------------------------------------------------------------------------------------ train cases


def training_contenders(cases: list[Case]) -> dict[tuple[str, str], Contender]:
    """One contender per (implementation, dtype) the training and checkpointing `cases` need, workers not started."""
    wanted: list[tuple[str, str]] = []
    for case in cases:
        if case.kind == "train":
            wanted += [(impl, case.dtype) for impl in IMPLEMENTATIONS]
            if case.dtype == "bf16":
                wanted.append(("ours", "fp32"))  # for ours bf16 / fp32
        elif case.kind == "ckpt":
            wanted += [("ours", case.dtype), ("ours-ckpt", case.dtype)]
        elif case.kind == "lora":
            wanted += [(impl, case.dtype) for impl in LORA_IMPLEMENTATIONS]
    order = {
        impl: index for index, impl in enumerate(("ours", "ref", "dense", "ours-ckpt", "lora", "peft-params"))
    }
    wanted = sorted(set(wanted), key=lambda pair: (DTYPES.index(pair[1]), order[pair[0]]))
    size = cases[0].size
    return {
        (impl, dtype): Contender(
            f"{impl}-{dtype}", {"kind": "train", "size": size, "dtype": dtype, "impl": impl}
        )
        for impl, dtype in wanted
    }


def training_case_header(case: Case) -> dict:
    """The fields every training-step record starts with."""
    return {
        "case": case.name,
        "config": case.size,
        "dtype": case.dtype,
        "batch": list(TRAIN_BATCH[case.size]),
    }


def train_case_record(case: Case, contenders: dict, memory: MemoryCache, tokens: int) -> dict:
    """The JSON record of one `train-*` case."""
    ours, ref, dense = (contenders.get((impl, case.dtype)) for impl in IMPLEMENTATIONS)
    record = {
        **training_case_header(case),
        **contender_fields("ours", ours, tokens),
        **contender_fields("ref", ref, tokens),
        **contender_fields("dense", dense, tokens),
    }
    record["ratio"] = ratio(record.get("ours_tok_s"), record.get("ref_tok_s"))
    record["ours_vs_dense"] = ratio(record.get("ours_tok_s"), record.get("dense_tok_s"))
    if case.dtype == "bf16":
        ours_fp32 = contenders.get(("ours", "fp32"))
        record["ours_fp32_tok_s"] = tokens_per_s(ours_fp32, tokens)
        record["ours_bf16_vs_fp32"] = ratio(record.get("ours_tok_s"), record["ours_fp32_tok_s"])
    record["ours_first_loss"], record["ref_first_loss"] = first_loss(ours), first_loss(ref)
    if record["ours_first_loss"] is not None and record["ref_first_loss"] is not None:
        record["first_loss_abs_diff"] = abs(record["ours_first_loss"] - record["ref_first_loss"])
    for impl in IMPLEMENTATIONS:
        record.update(memory_fields(impl, memory.get(case.kind, case.size, case.dtype, impl)))
    return record


def ckpt_case_record(case: Case, contenders: dict, memory: MemoryCache, tokens: int) -> dict:
    """The JSON record of one `ckpt-*` case: ours with gradient checkpointing against ours without."""
    plain, ckpt = contenders.get(("ours", case.dtype)), contenders.get(("ours-ckpt", case.dtype))
    record = {
        **training_case_header(case),
        **contender_fields("ours", plain, tokens),
        **contender_fields("ours_ckpt", ckpt, tokens),
    }
    record["ckpt_speed_ratio"] = ratio(record.get("ours_ckpt_tok_s"), record.get("ours_tok_s"))
    record.update(memory_fields("ours", memory.get("train", case.size, case.dtype, "ours")))
    record.update(memory_fields("ours_ckpt", memory.get("train", case.size, case.dtype, "ours-ckpt")))
    record["ckpt_peak_rss_ratio"] = ratio(record.get("ours_ckpt_peak_rss_mb"), record.get("ours_peak_rss_mb"))
    record["ckpt_step_rss_growth_ratio"] = ratio(
        record.get("ours_ckpt_step_rss_growth_mb"), record.get("ours_step_rss_growth_mb")
    )
    return record


def lora_case_record(case: Case, contenders: dict, memory: MemoryCache, tokens: int) -> dict:
    """The JSON record of one `lora-*` case: our expert LoRA against PEFT `target_parameters` and full tuning."""
    record = training_case_header(case)
    for impl in LORA_IMPLEMENTATIONS:
        prefix = impl.replace("-", "_")
        record.update(contender_fields(prefix, contenders.get((impl, case.dtype)), tokens))
        record.update(memory_fields(prefix, memory.get("train", case.size, case.dtype, impl)))
    record["lora_vs_peft_params"] = ratio(record.get("lora_tok_s"), record.get("peft_params_tok_s"))
    record["lora_vs_full"] = ratio(record.get("lora_tok_s"), record.get("ours_tok_s"))
    record["lora_peak_vs_peft_params"] = ratio(
        record.get("lora_peak_rss_mb"), record.get("peft_params_peak_rss_mb")
    )
    record["lora_peak_vs_full"] = ratio(record.get("lora_peak_rss_mb"), record.get("ours_peak_rss_mb"))
    return record


CASE_IMPLEMENTATIONS = {"train": IMPLEMENTATIONS, "ckpt": ("ours", "ours-ckpt"), "lora": LORA_IMPLEMENTATIONS}
CASE_RECORDS = {"train": train_case_record, "ckpt": ckpt_case_record, "lora": lora_case_record}


def run_training_group(size: str, cases: list[Case], args, memory: MemoryCache) -> list[dict]:
    """Every training/checkpointing case of one size: one rotation per dtype, each variant in its own worker.

    One rotation per dtype rather than one for the whole size bounds the memory: every worker keeps its model,
    its optimizer state and the heap its steps left behind (medium: 2-4 GiB each), and all of a rotation's
    workers live at once. A bf16 rotation runs ours in fp32 as well, for the bf16 / fp32 ratio.
    """
    for case in cases:  # memory first, in subprocesses, before the workers start
        for impl in CASE_IMPLEMENTATIONS[case.kind]:
            memory.get(case.kind, case.size, case.dtype, impl)
    batch, sequence = TRAIN_BATCH[size]
    records: dict[str, dict] = {}
    for dtype in DTYPES:
        for family in (("train", "ckpt"), ("lora",)):  # LoRA apart: five medium workers would not fit in RAM
            rotation = [case for case in cases if case.dtype == dtype and case.kind in family]
            if not rotation:
                continue
            contenders = training_contenders(rotation)
            labels = ", ".join(c.label for c in contenders.values())
            log(
                f"training {size} {dtype} ({', '.join(c.name for c in rotation)}): {labels}, each in its own process"
            )
            with running_workers(list(contenders.values())):
                other_cores = run_interleaved(list(contenders.values()), args.warmup, args.steps)
            for case in rotation:
                record = CASE_RECORDS[case.kind](case, contenders, memory, batch * sequence)
                records[case.name] = {**record, "other_procs_cpu_cores": other_cores}
    return [records[case.name] for case in cases]


# ----------------------------------------------------------------------------------------- decode case


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first new token position where two [batch, n] outputs differ in any row, None when equal."""
    if a.shape != b.shape:
        return 0
    differing = (a != b).nonzero()
    return int(differing[:, -1].min()) if differing.numel() else None


def run_decode_case(case: Case, args, memory: MemoryCache) -> dict:
    """Greedy decoding of ours (eager and compiled) against the reference, each in its own worker, interleaved;
    checks they chose the same tokens."""
    memory_results = {}
    if case.batch == 1:  # the KV cache and activations are small: batch 1 eager shows the model's footprint
        memory_results = {
            impl: memory.get("decode", case.size, case.dtype, impl, case.batch) for impl in ("ours", "ref")
        }
    spec = {"kind": "decode", "size": case.size, "dtype": case.dtype, "batch": case.batch}
    contenders = {
        impl: Contender(f"{impl}-{case.name}", {**spec, "impl": impl}) for impl in DECODE_IMPLEMENTATIONS
    }
    log(f"{case.name}: {', '.join(DECODE_IMPLEMENTATIONS)}, each in its own process")
    with running_workers(list(contenders.values())):
        other_cores = run_interleaved(list(contenders.values()), args.warmup, args.steps)
    for contender in contenders.values():  # the workers send the new token ids as lists
        contender.outputs = [torch.tensor(output) for output in contender.outputs]
    tokens = case.batch * DECODE_NEW_TOKENS
    record = {
        "case": case.name,
        "config": case.size,
        "dtype": case.dtype,
        "prompt": [case.batch, DECODE_PROMPT_LEN],
        "new_tokens": DECODE_NEW_TOKENS,
    }
    for impl, contender in contenders.items():
        record.update(contender_fields(impl, contender, tokens))
    record["ratio"] = ratio(record.get("ours_tok_s"), record.get("ref_tok_s"))
    record["compiled_ratio"] = ratio(record.get("compiled_tok_s"), record.get("ref_tok_s"))
    record["compiled_vs_ours"] = ratio(record.get("compiled_tok_s"), record.get("ours_tok_s"))
    record["other_procs_cpu_cores"] = other_cores
    ref_outputs = contenders["ref"].outputs
    others = [out for impl in ("ours", "compiled") for out in contenders[impl].outputs]
    if ref_outputs and others:
        reference_tokens = ref_outputs[0]
        record["new_tokens_generated"] = int(reference_tokens.shape[1])
        agree = [
            float((out == reference_tokens).float().mean())
            for out in others
            if out.shape == reference_tokens.shape
        ]
        record["token_agreement"] = min(agree) if len(agree) == len(others) else 0.0
        if case.dtype == "fp32":
            mismatches = [first_mismatch(out, reference_tokens) for out in others + ref_outputs]
            record["same_tokens"] = all(index is None for index in mismatches)
            if not record["same_tokens"]:
                record["first_mismatch"] = min(index for index in mismatches if index is not None)
    elif case.dtype == "fp32":
        record["same_tokens"] = None
    for impl, result in memory_results.items():
        record.update(memory_fields(impl, result))
    return record


# --------------------------------------------------------------------------------------------- summary


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    """A table cell: the number with `digits` decimals, or an em dash when missing."""
    return "—" if value is None else f"{value:,.{digits}f}{suffix}"


def fmt_rss(record: dict, prefix: str) -> str:
    """`peak (+growth per step)` MiB of one implementation."""
    peak = record.get(f"{prefix}_peak_rss_mb")
    if peak is None:
        return "—"
    return f"{peak:,.0f} (+{record.get(f'{prefix}_step_rss_growth_mb', 0):,.0f})"


def case_notes(record: dict) -> str:
    """Decode parity, errors and CPU contention of one case, for the table's notes column."""
    notes = []
    if "same_tokens" in record:
        notes.append(f"same tokens: {record['same_tokens']}")
    elif "token_agreement" in record:
        notes.append(f"tokens agreeing with ref: {record['token_agreement']:.0%}")
    notes += [f"{key} (see JSON)" for key in record if key.endswith("error")]
    other = record.get("other_procs_cpu_cores")
    if other is not None and other > 0.25:
        notes.append(f"noisy: other processes used {other:.1f} cores")
    return "; ".join(notes)


def markdown_summary(records: list[dict], env: dict, args) -> str:
    """Markdown tables of every case, for the README."""
    lines = [
        f"CPU benchmark, torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads "
        f"({env['cpu_capability']}), median of {args.steps} steps after {args.warmup} warm-up, each implementation "
        "in its own process, steps interleaved in time. "
        "Ratios are ours / other (> 1: ours faster). RSS: peak MiB of a fresh process per implementation "
        "(+ peak rise within one step).",
    ]
    train = [r for r in records if r["case"].startswith("train-")]
    if train:
        lines += [
            "",
            "| case | ours tok/s | ref tok/s | ours/ref | dense tok/s | ours/dense | ours bf16/fp32 "
            "| ours RSS MiB | ref RSS MiB | dense RSS MiB | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
    for r in train:
        lines.append(
            f"| {r['case']} | {fmt(r.get('ours_tok_s'))} | {fmt(r.get('ref_tok_s'))} | {fmt(r.get('ratio'), 2, '×')} "
            f"| {fmt(r.get('dense_tok_s'))} | {fmt(r.get('ours_vs_dense'), 2, '×')} "
            f"| {fmt(r.get('ours_bf16_vs_fp32'), 2, '×')} | {fmt_rss(r, 'ours')} | {fmt_rss(r, 'ref')} "
            f"| {fmt_rss(r, 'dense')} | {case_notes(r)} |"
        )
    decode = [r for r in records if r["case"].startswith("decode-")]
    if decode:
        lines += [
            "",
            f"Greedy decoding, {DECODE_NEW_TOKENS} new tokens after a batch x {DECODE_PROMPT_LEN} prompt (tok/s: "
            "new tokens of the whole batch per second, prefill included). compiled: ours with the static cache "
            "and an inductor-compiled forward. bf16: weights in bf16.",
            "",
            "| case | ours tok/s | compiled tok/s | ref tok/s | ours/ref | compiled/ref | ours RSS MiB "
            "| ref RSS MiB | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in decode:
            lines.append(
                f"| {r['case']} | {fmt(r.get('ours_tok_s'))} | {fmt(r.get('compiled_tok_s'))} "
                f"| {fmt(r.get('ref_tok_s'))} | {fmt(r.get('ratio'), 2, '×')} "
                f"| {fmt(r.get('compiled_ratio'), 2, '×')} | {fmt_rss(r, 'ours')} | {fmt_rss(r, 'ref')} "
                f"| {case_notes(r)} |"
            )
    ckpt = [r for r in records if r["case"].startswith("ckpt-")]
    if ckpt:
        lines += [
            "",
            "Gradient checkpointing (ours only; transformers' JetMoe does not support it):",
            "",
            "| case | tok/s without | tok/s with | speed with/without | RSS MiB without | RSS MiB with "
            "| peak ratio | step growth ratio | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in ckpt:
            lines.append(
                f"| {r['case']} | {fmt(r.get('ours_tok_s'))} | {fmt(r.get('ours_ckpt_tok_s'))} "
                f"| {fmt(r.get('ckpt_speed_ratio'), 2, '×')} | {fmt_rss(r, 'ours')} | {fmt_rss(r, 'ours_ckpt')} "
                f"| {fmt(r.get('ckpt_peak_rss_ratio'), 2, '×')} | {fmt(r.get('ckpt_step_rss_growth_ratio'), 2, '×')} "
                f"| {case_notes(r)} |"
            )
    lora = [r for r in records if r["case"].startswith("lora-")]
    if lora:
        lines += [
            "",
            f"LoRA rank {LORA_RANK} on every MoA / MoE expert and kv_proj: our expert LoRA (inside the sorted "
            "dispatch) vs PEFT `target_parameters` (full expert deltas) vs full fine-tuning of ours:",
            "",
            "| case | expert LoRA tok/s | PEFT params tok/s | full tok/s | LoRA/PEFT | LoRA/full "
            "| LoRA RSS MiB | PEFT RSS MiB | full RSS MiB | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in lora:
            lines.append(
                f"| {r['case']} | {fmt(r.get('lora_tok_s'))} | {fmt(r.get('peft_params_tok_s'))} "
                f"| {fmt(r.get('ours_tok_s'))} | {fmt(r.get('lora_vs_peft_params'), 2, '×')} "
                f"| {fmt(r.get('lora_vs_full'), 2, '×')} | {fmt_rss(r, 'lora')} | {fmt_rss(r, 'peft_params')} "
                f"| {fmt_rss(r, 'ours')} | {case_notes(r)} |"
            )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small config only, 1 warm-up + 3 timed steps")
    parser.add_argument("--cases", help="comma-separated glob patterns of case names, e.g. 'train-small-*'")
    parser.add_argument("--list", action="store_true", help="list the case names and exit")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant (default 2, quick 1)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default 5, quick 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads per implementation (default: all cores); 1 is steadier on a machine others load",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where model.jsonl and model.md go")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.steps is None:
        args.steps = 3 if args.quick else 5
    return args


def emit(record: dict, env: dict, jsonl) -> dict:
    """Print one case's JSON line to stdout and append it to the results file."""
    record = rounded({**record, "load_avg_1m": round(os.getloadavg()[0], 2), **env})
    line = json.dumps(record)
    print(line, flush=True)
    jsonl.write(line + "\n")
    jsonl.flush()
    return record


def _exit_on_sigterm(signum, frame) -> None:
    """SIGTERM ends the benchmark like Ctrl-C does, through the `finally` blocks that stop the workers."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the selected cases; returns 1 when a case errored or decoding disagreed, else 0."""
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))), flush=True)
        return 0
    if args.list:
        print("\n".join(case.name for case in ALL_CASES))
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that `finally` stops the contender workers
    if args.threads:
        os.environ[THREADS_ENV] = str(args.threads)
    configure_process()
    cases = select_cases(args.cases, args.quick)
    env = {**environment(), "warmup_steps": args.warmup, "timed_steps": args.steps, "quick": args.quick}
    memory = MemoryCache(not args.no_memory, warmup=1, steps=1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log(f"cases: {', '.join(case.name for case in cases)}; {env['threads']} threads")
    started = time.perf_counter()
    records = []
    with open(args.out_dir / "model.jsonl", "w") as jsonl:
        for size in MODEL_SIZES:
            group = [case for case in cases if case.size == size and case.kind in CASE_RECORDS]
            if group:
                records += [emit(r, env, jsonl) for r in run_training_group(size, group, args, memory)]
        for case in cases:
            if case.kind == "decode":
                records.append(emit(run_decode_case(case, args, memory), env, jsonl))
    summary = markdown_summary(records, env, args)
    (args.out_dir / "model.md").write_text(summary)
    print("\n" + summary, file=sys.stderr, flush=True)
    log(f"done in {time.perf_counter() - started:.0f}s; results in {args.out_dir}")
    failed = [
        r["case"] for r in records if any(k.endswith("error") for k in r) or r.get("same_tokens") is False
    ]
    if failed:
        log(f"problems in: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
