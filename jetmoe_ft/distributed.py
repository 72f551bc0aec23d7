"""What JetMoE needs from a multi-process launch: ZeRO-3 leaf modules, a whole final export, honest CPU runs.

The launch itself is accelerate's (`configs/*.yaml`); these functions are called by the loader and the
training loops so that every loop behaves the same under DDP, FSDP2 and DeepSpeed.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled

from .compat import is_accelerate_prepared, unmark_accelerate_prepared
from .config import RecipeError
from .modeling.modeling_jetmoe import JetMoeAttention, JetMoeMoE

# ZeRO-3 gathers a leaf module's parameters, its children's included, when the leaf is *called*; so the
# leaves must be modules that run through `__call__`. `JetMoeMoA` is not: the attention calls its
# `map` and `reduce` methods, so as a leaf its hooks never fire and its gradients are never reduced
# (on 2 ranks: "RuntimeError: unknown parameter type" in ZeRO-3's `zero_grad` after the first step).
# `JetMoeAttention`, which owns the MoA experts and calls them, takes its place.
ZERO3_LEAF_CLASSES: tuple[type[nn.Module], ...] = (JetMoeAttention, JetMoeMoE)

GPU_ONLY_LAUNCHES = {
    "ACCELERATE_USE_FSDP": "FSDP (configs/fsdp2.yaml)",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed (configs/zero2.yaml, configs/zero3.yaml)",
}


def declare_zero3_leaf_modules(model: nn.Module) -> list[str]:
    """Under DeepSpeed ZeRO-3, make every MoA attention and MoE block a ZeRO-3 leaf; returns their names.

    A leaf's parameters are gathered in one piece when it is entered, whichever experts the rank's tokens
    pick, and ZeRO-3 no longer traces the order of the expert calls inside it: the cure for the MoE
    hangs of DeepSpeed #4808 / TRL #1268. Outside ZeRO-3 this does nothing.
    """
    if not is_deepspeed_zero3_enabled():
        return []
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, list(ZERO3_LEAF_CLASSES))
    return [name for name, module in model.named_modules() if getattr(module, "_z3_leaf", False)]


def check_launch(cuda_available: bool | None = None) -> None:
    """Refuse an FSDP or DeepSpeed launch on a machine without a GPU, before anything loads.

    accelerate 1.15 turns FSDP and DeepSpeed on for GPU process groups only: on CPU ranks it drops the
    plugin and each run would silently be plain DDP (or one process training alone).
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cuda_available:
        return
    for variable, what in GPU_ONLY_LAUNCHES.items():
        if os.environ.get(variable, "false").lower() == "true":
            raise RecipeError(
                f"{what} needs GPUs: accelerate runs it on GPU ranks only. On CPU launch with "
                "`--config_file configs/cpu_ddp.yaml` (DDP)."
            )


def let_training_wrap_the_model(trainer) -> bool:
    """After `trainer.evaluate()` and before `trainer.train()`: let training wrap the model in DDP again.

    An evaluation before training prepares the bare model for evaluation only, and accelerate marks it as
    prepared; `train()` then skips the DDP wrapper and every rank trains on its own gradients (measured on
    2 CPU ranks: the ranks' gradients differed and rank 0 saved a model trained on its half of the data).
    FSDP and DeepSpeed prepare the model fully for evaluation and are left alone. Returns whether it acted.
    """
    model = trainer.model
    distributed = trainer.accelerator.num_processes > 1
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if not distributed or sharded or trainer.model_wrapped is not model:
        return False
    if not is_accelerate_prepared(model):
        return False
    unmark_accelerate_prepared(model)
    return True


def prepare_final_save(trainer) -> bool:
    """Make `trainer.save_model()` write a whole model or adapter under FSDP with sharded checkpoints.

    transformers saves nothing in `save_model` while FSDP's state-dict type is `SHARDED_STATE_DICT`
    (the one `configs/fsdp2.yaml` uses for fast, resumable checkpoints), so the final export switches
    to a full state dict, gathered on rank 0. Returns whether it switched.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    plugin = trainer.accelerator.state.fsdp_plugin
    if "FULL_STATE_DICT" in str(plugin.state_dict_type):
        return False
    plugin.set_state_dict_type("FULL_STATE_DICT")
    return True


def is_main_process() -> bool:
    """Whether this is the process that writes shared files and prints summaries (global rank 0).

    Read from the launcher's `RANK`, so it holds before any process group or trainer exists."""
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------
# Several nodes: one output_dir that every node sees. Checkpoints, the lock, the fingerprint and resuming all live
# there and are written once, by the main process; so a run on several nodes needs a shared file system.


def num_nodes() -> int:
    """How many machines the launch spans (torchrun's `GROUP_WORLD_SIZE`; 1 outside a launcher)."""
    return int(os.environ.get("GROUP_WORLD_SIZE", "1"))


def check_nodes_share(output_dir: str | os.PathLike, save_on_each_node: bool) -> None:
    """On several nodes, before any model loads: refuse `save_on_each_node` and an `output_dir` that is not one
    shared directory. The main process writes a token there; the first process of every other node must read it
    back (one broadcast and one gather over the process group). Every process raises the same `RecipeError`."""
    if num_nodes() <= 1:
        return
    if save_on_each_node:
        raise RecipeError(
            "save_on_each_node: true makes every node write its own copy of each checkpoint; jetmoe-ft keeps one "
            "output_dir on a file system all nodes share (checkpoints, lock, fingerprint, resuming); set it false."
        )
    if not (dist.is_available() and dist.is_initialized()):
        return
    folder = Path(output_dir) / RANKS_DIR
    token = [f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}" if is_main_process() else None]
    if is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "shared").write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    here = {"host": socket.gethostname(), "node": int(os.environ.get("GROUP_RANK", "0")), "sees": True}
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            here["sees"] = (folder / "shared").read_text() == token[0]
        except OSError:
            here["sees"] = False
    everyone: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(everyone, here)
    blind = sorted({(record["node"], record["host"]) for record in everyone if not record["sees"]})
    if blind:
        nodes = ", ".join(f"node {node} ({host})" for node, host in blind)
        raise RecipeError(
            f"output_dir: {output_dir} is not shared between the nodes: {nodes} cannot see what node 0 wrote there; "
            "put it on a file system every node mounts (checkpoints, the lock and resuming live there)."
        )


# ---------------------------------------------------------------------------------------------
# A lost process: when one rank of a multi-process run dies (killed, crashed, its machine gone), the others stop
# with one line naming it and the checkpoint to resume from (exit status 4), instead of a gloo/NCCL traceback, a
# silent SIGTERM from the launcher, or a wait in the next collective for the process group's timeout.

LOST_PROCESS_EXIT = 4
"""Exit status of a rank that stopped because another process of its run is gone."""

RANKS_DIR = ".jetmoe-ft.ranks"
POLL_SECONDS = 0.5
HEARTBEAT_TIMEOUT_VARIABLE = "JETMOE_FT_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT_S = 60.0
"""Seconds without a heartbeat after which a rank on another machine counts as lost (`JETMOE_FT_HEARTBEAT_TIMEOUT`)."""


def machine_of(record: dict) -> tuple[str, int]:
    """Which machine a rank runs on: its host and its launcher's node rank (`GROUP_RANK`, torchrun's
    `--node_rank` / accelerate's `--machine_rank`), so that two "nodes" emulated on one host are two machines."""
    return str(record.get("host")), int(record.get("node", 0))


class ProcessWatch:
    """Each rank publishes `output_dir/.jetmoe-ft.ranks/rank-N.json` (pid, host, node, process start time) and, from
    a daemon thread, watches the other ranks:

    - ranks on its own machine by their process: a peer counts once it has been seen alive (a file left by an
      earlier run names a dead process and is never counted); it is lost when its process is gone while its file is
      still there (a rank that ends normally or with a handled error removes its file first);
    - ranks on other machines by a heartbeat through the launch's rendezvous store (`Heartbeat`): a peer that has
      beaten once is lost when its count stops moving for `JETMOE_FT_HEARTBEAT_TIMEOUT` seconds (default 60)
      without it having said goodbye.

    On a loss the watch prints the one line and ends this process with `LOST_PROCESS_EXIT`: from the thread when
    the main thread is stuck in a collective, from `run_command` when the collective failed first (gloo: "Connection
    reset by peer"), from the SIGTERM handler when the launcher tears the survivors down first.
    """

    def __init__(self, output_dir: str | os.PathLike, resume_hint: Callable[[], str]):
        import psutil

        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.folder = Path(output_dir) / RANKS_DIR
        self.resume_hint = resume_hint
        self.host = socket.gethostname()
        node = int(os.environ.get("GROUP_RANK", "0"))
        self.me = {
            "pid": os.getpid(),
            "host": self.host,
            "node": node,
            "created": psutil.Process().create_time(),
        }
        self.seen: dict[int, dict] = {}  # peers on this machine seen alive: rank -> their record
        self.lost: tuple[int, dict, str] | None = None  # (rank, record, how it was noticed)
        self.heartbeat = Heartbeat(self.rank, self.me)
        self._reported = threading.Lock()
        self._stop = threading.Event()
        self.folder.mkdir(parents=True, exist_ok=True)
        own = self.folder / f"rank-{self.rank}.json"
        partial = own.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(self.me) + "\n")
        os.replace(partial, own)  # peers never read half a file
        self.file = own
        self._thread = threading.Thread(target=self._watch, name="jetmoe-ft-process-watch", daemon=True)

    def start(self) -> ProcessWatch:
        self._thread.start()
        self.heartbeat.start()
        return self

    def check(self) -> tuple[int, dict, str] | None:
        """Look at every peer once; the lost one as (rank, record, how), or None."""
        if self.lost is not None:
            return self.lost
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            record = _read_json(self.folder / f"rank-{rank}.json")
            if record is None or machine_of(record) != machine_of(self.me):
                continue  # gone cleanly, not written yet, or on another machine (the heartbeat's)
            alive = _same_process_alive(record)
            if alive:
                self.seen[rank] = record
            elif self.seen.get(rank) == record:
                self.lost = (rank, record, "killed or crashed")
                return self.lost
        if self.heartbeat.silent is not None:
            rank, record, seconds = self.heartbeat.silent
            self.lost = (rank, record, f"no heartbeat from its machine for {seconds:.0f} s")
        return self.lost

    def line(self) -> str:
        rank, record, how = self.lost
        where = (
            ""
            if machine_of(record) == machine_of(self.me)
            else f" on {record.get('host')} (node {record.get('node', 0)})"
        )
        return f"error: process rank {rank} (pid {record.get('pid')}){where} of this run is gone ({how}); {self.resume_hint()}"

    def report(self, wait_s: float = 0.0) -> bool:
        """Print the line once (whichever of the thread, the handler and `run_command` comes first); whether a
        peer is lost. `wait_s`: keep looking that long (a failed collective whose peer's heartbeat is still fresh)."""
        deadline = time.monotonic() + wait_s
        while self.check() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        if self._reported.acquire(blocking=False):
            print(self.line(), file=sys.stderr, flush=True)
        return True

    def stop(self) -> None:
        """This rank ends normally (or with a handled error): stop watching, say goodbye and take its file away."""
        self._stop.set()
        self.heartbeat.stop()
        _remove_if_mine(self.file, self.me)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            if self.report():
                os._exit(LOST_PROCESS_EXIT)  # the main thread may be blocked in a collective for good


class Heartbeat:
    """Liveness of ranks on other machines, through the launch's rendezvous store: the `torch.distributed.TCPStore`
    at `MASTER_ADDR:MASTER_PORT` (torchrun's agent on node 0 under `accelerate launch`), reached by a client of its
    own from a daemon thread of its own. Each rank adds 1 to `beat/RANK` every poll; a peer is silent when its count
    has not moved for the timeout (measured on this machine's clock, so the machines' clocks need not agree). When
    the store cannot be reached (node 0's launcher is gone, or the run is ending) the heartbeat stops and judges
    nobody."""

    PREFIX = "jetmoe-ft/watch/"

    def __init__(self, rank: int, me: dict):
        self.rank = rank
        self.me = me
        self.timeout_s = float(os.environ.get(HEARTBEAT_TIMEOUT_VARIABLE, DEFAULT_HEARTBEAT_TIMEOUT_S))
        self.address = (os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
        self.peers: dict[int, dict] = {}  # ranks on other machines: their record
        self.silent: tuple[int, dict, float] | None = None  # (rank, record, seconds without a beat)
        self._counts: dict[int, tuple[int, float]] = {}  # rank -> (last count, when it last moved)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jetmoe-ft-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        if all(self.address):
            self._thread.start()
        return self

    def stop(self) -> None:
        """Say goodbye (peers stop judging this rank) and stop beating."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * POLL_SECONDS + 1)

    @property
    def watches_other_machines(self) -> bool:
        return bool(self.peers)

    def _run(self) -> None:
        try:
            client = dist.TCPStore(
                self.address[0],
                int(self.address[1]),
                is_master=False,
                timeout=datetime.timedelta(seconds=10),
                wait_for_workers=False,
            )
            store = dist.PrefixStore(self.PREFIX, client)
            store.set(f"who/{self.rank}", json.dumps(self.me))
            while not self._stop.wait(POLL_SECONDS):
                store.add(f"beat/{self.rank}", 1)
                self.silent = self.silent or self._silent_peer(store)
            store.set(f"bye/{self.rank}", "1")
        except (
            Exception
        ):  # the store is unreachable or gone (node 0's launcher ended): a watchdog never crashes
            return

    def _silent_peer(self, store) -> tuple[int, dict, float] | None:
        now = time.monotonic()
        for rank in range(int(os.environ.get("WORLD_SIZE", "1"))):
            if rank == self.rank:
                continue
            if rank not in self.peers:
                if not store.check([f"who/{rank}"]):
                    continue  # not started yet
                record = json.loads(store.get(f"who/{rank}"))
                if machine_of(record) == machine_of(self.me):
                    continue  # watched by its process
                self.peers[rank] = record
            if store.check([f"bye/{rank}"]):
                continue
            count = store.add(f"beat/{rank}", 0)
            last = self._counts.get(rank)
            if last is None or last[0] != count:
                self._counts[rank] = (count, now)
            elif now - last[1] > self.timeout_s:
                return rank, self.peers[rank], now - last[1]
        return None


_WATCH: list[ProcessWatch] = []


def watch_processes(output_dir: str | os.PathLike, resume_hint: Callable[[], str]) -> ProcessWatch | None:
    """In a run of several processes (`WORLD_SIZE` > 1): start this rank's `ProcessWatch` and a SIGTERM handler
    that names a lost peer before the launcher's teardown ends this process. Call from the main thread."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    stop_watching()
    watch = ProcessWatch(output_dir, resume_hint).start()
    _WATCH[:] = [watch]
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            if watch.report():
                os._exit(LOST_PROCESS_EXIT)
            if callable(previous):
                previous(signum, frame)
                return
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)
    return watch


def report_lost_process(error: BaseException | None = None) -> bool:
    """After an error in a multi-process run: if another process of the run is gone, print the one line and
    return True (the error was its consequence). A failed collective (`torch.distributed.DistError`) while ranks
    on other machines are watched waits up to the heartbeat timeout for their verdict."""
    if not _WATCH:
        return False
    watch = _WATCH[0]
    peer_failure = isinstance(error, dist.DistError) or "by peer" in str(error)
    wait_s = (
        watch.heartbeat.timeout_s + 2 * POLL_SECONDS
        if peer_failure and watch.heartbeat.watches_other_machines
        else 0.0
    )
    return watch.report(wait_s)


def stop_watching() -> None:
    """This rank is ending normally or with a handled error (its peers must not report it as lost)."""
    while _WATCH:
        _WATCH.pop().stop()


def _same_process_alive(record: dict) -> bool:
    import psutil

    try:
        process = psutil.Process(int(record["pid"]))
        same = abs(process.create_time() - float(record["created"])) < 1e-3
        return same and process.status() != psutil.STATUS_ZOMBIE  # killed, not yet reaped by its launcher
    except (psutil.NoSuchProcess, psutil.ZombieProcess, KeyError, TypeError, ValueError):
        return False
    except psutil.AccessDenied:
        return True


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _remove_if_mine(path: Path, me: dict) -> None:
    if _read_json(path) == me:
        path.unlink(missing_ok=True)
