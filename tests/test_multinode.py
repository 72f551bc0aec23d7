"""Several nodes through accelerate, on this machine.

- Two `accelerate launch` commands (`--num_machines 2 --machine_rank 0|1`, one CPU process each, gloo) train as
  one launch of 2 processes on one node; each output is written by one process only.
- SIGTERM to one process of that 1-node, 2-process run: every process stops at the same step with a checkpoint
  (exit 75, one line), and the same command with `--resume_from_checkpoint true` ends bit-identical to the
  uninterrupted two-node run.
- The accelerate configs take the multi-node flags; FSDP2 shards across two nodes; a rank on another node that
  vanishes is reported (exit 4); an output_dir the nodes do not share, or `save_on_each_node`, is refused; a lock
  held on another machine is respected; the SLURM script starts one launcher per node.
"""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from jetmoe_ft.distributed import LOST_PROCESS_EXIT, RANKS_DIR, check_nodes_share
from jetmoe_ft.errors import RecipeError
from jetmoe_ft.training.preemption import PREEMPTED_EXIT

from .test_distributed import _assert_matches_one_process, one_process  # noqa: F401 (a fixture)
from .test_lost_rank import _free_port, _wait

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
STEPS = 8
# plain SGD, constant rate, no router loss: updates linear in the rank-averaged gradients (tests/test_distributed.py)
RUN = ["--config", str(ROOT / "recipes" / "tiny" / "sft.yaml"), "--max_train_samples", "32"]
RUN += ["--max_eval_samples", "4", "--max_length", "64", "--per_device_train_batch_size", "2"]
RUN += ["--optim", "sgd", "--learning_rate", "0.05", "--lr_scheduler_type", "constant", "--warmup_steps", "0"]
RUN += ["--aux_loss_coef", "0", "--max_steps", str(STEPS), "--save_steps", "2", "--logging_steps", "1"]
RUN += ["--report_to", "none", "--seed", "7"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _node(rank: int, port: int, output_dir: Path, umask: int) -> subprocess.Popen:
    """One "node": its own `accelerate launch`, one CPU process, rendezvous at 127.0.0.1:`port`."""
    command = [ACCELERATE, "launch", "--config_file", str(ROOT / "configs" / "cpu_ddp.yaml")]
    command += ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    command += [
        "--num_cpu_threads_per_process",
        "1",
        "-m",
        "jetmoe_ft.sft",
        *RUN,
        "--output_dir",
        str(output_dir),
    ]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.umask(umask),
    )


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> tuple[Path, list[tuple[int, str, str]]]:
    """The two-node run. Node 1 creates files with every permission bit (umask 0), node 0 with none for others
    (umask 077): a file's mode tells which node wrote it."""
    output_dir = tmp_path_factory.mktemp("two-nodes") / "run"
    port = _free_port()
    nodes = [_node(rank, port, output_dir, umask) for rank, umask in ((0, 0o077), (1, 0o000))]
    results = [_wait(node, 600) for node in nodes]
    for rank, (status, _, err) in enumerate(results):
        assert status == 0, f"node {rank}: {err[-3000:]}"
    return output_dir, results


def _one_node(output_dir: Path, *extra: str) -> subprocess.Popen:
    command = [ACCELERATE, "launch", "--config_file", str(ROOT / "configs" / "cpu_ddp.yaml")]
    command += ["--main_process_port", str(_free_port()), "-m", "jetmoe_ft.sft", *RUN]
    command += ["--output_dir", str(output_dir), *extra]
    return subprocess.Popen(
        command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def preempted(tmp_path_factory) -> tuple[Path, tuple[int, str, str, dict], tuple[int, str, str]]:
    """A 1-node, 2-process launch; SIGTERM to its rank 1 once the first checkpoint is written (its status, output and
    the checkpoints it left); then the same command with `--resume_from_checkpoint true`."""
    output_dir = tmp_path_factory.mktemp("one-node") / "run"
    launch = _one_node(output_dir)
    try:
        deadline = time.monotonic() + 400
        while not (output_dir / "checkpoint-2" / "trainer_state.json").is_file():
            assert launch.poll() is None, launch.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 400 s"
            time.sleep(0.05)
        rank_1 = json.loads((output_dir / RANKS_DIR / "rank-1.json").read_text())["pid"]
        os.kill(rank_1, signal.SIGTERM)
        stopped = _wait(launch, 300)
    finally:
        if launch.poll() is None:
            launch.kill()
    # the checkpoints as the stopped run left them (the resumed run rotates them away)
    left = {path.name: sorted(p.name for p in path.iterdir()) for path in output_dir.glob("checkpoint-*")}
    left |= {
        name + "/step": json.loads((output_dir / name / "trainer_state.json").read_text())["global_step"]
        for name in list(left)
        if "trainer_state.json" in left[name]
    }
    resumed = _wait(_one_node(output_dir, "--resume_from_checkpoint", "true"), 600)
    return output_dir, (*stopped, left), resumed


def _logs(checkpoint: Path) -> list[tuple[int, float, float]]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [(entry["step"], entry["loss"], entry["grad_norm"]) for entry in history if "loss" in entry]


# ---------------------------------------------------------------------------------------------
# two nodes, one launch of two processes


def test_two_nodes_train_as_one_node_of_two_processes(two_nodes, preempted):
    two, _ = two_nodes
    one, _, (status, out, err) = preempted
    assert status == 0, err[-3000:]
    assert f"Trained {STEPS} steps" in out and "on 2 processes (cpu)" in out
    logs_two, logs_one = _logs(two / f"checkpoint-{STEPS}"), _logs(one / f"checkpoint-{STEPS}")
    assert [step for step, _, _ in logs_two] == list(range(1, STEPS + 1))
    for (step, loss, grad_norm), (_, loss_one, grad_norm_one) in zip(logs_two, logs_one, strict=True):
        assert loss == pytest.approx(loss_one, abs=1e-5), step
        assert grad_norm == pytest.approx(grad_norm_one, abs=1e-5), step
    weights_two, weights_one = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_two_nodes_write_each_output_once(two_nodes):
    output_dir, [(_, out_0, _), (_, out_1, _)] = two_nodes
    for name in ("model.safetensors", "metrics.json", "README.md", "recipe.yaml", "routing.json", "run.json"):
        assert (output_dir / name).is_file(), name
    # every file was created by node 0 (umask 077), but rank 1's part of each checkpoint: its RNG state
    by_node_1 = sorted(
        str(path.relative_to(output_dir))
        for path in output_dir.rglob("*")
        if path.is_file() and path.stat().st_mode & stat.S_IWOTH
    )
    assert by_node_1 == [f"checkpoint-{step}/rng_state_1.pth" for step in (STEPS - 2, STEPS)]
    assert f"Outputs: {output_dir}" in out_0 and "Outputs:" not in out_1
    # ranks that end normally take their files away; the lock is released
    assert not list((output_dir / RANKS_DIR).glob("rank-*.json"))
    assert not (output_dir / ".jetmoe-ft.lock").exists()


# ---------------------------------------------------------------------------------------------
# preemption of one process of a 2-process run


def test_sigterm_to_one_process_checkpoints_every_process_and_resumes_bit_identically(two_nodes, preempted):
    two, _ = two_nodes
    one, (status, _, err, left), _ = preempted
    assert status != 0  # torchrun reports its processes' status 75 as a failure
    lines = [line for line in err.splitlines() if line.startswith("preempted:")]
    assert len(lines) == 1, err[-3000:]  # one line per node
    step = int(lines[0].split("stopped after step ")[1].split(";")[0])
    checkpoint = one / f"checkpoint-{step}"
    assert lines[0] == (
        f"preempted: SIGTERM: stopped after step {step}; the checkpoint is {checkpoint}; resume with the same "
        "command and --resume_from_checkpoint true."
    )
    assert 2 < step < STEPS
    # both processes stopped at that step with status 75, neither was killed by the launcher's teardown
    statuses = [int(line.split(":")[1].split()[0]) for line in err.splitlines() if "exitcode  :" in line]
    assert statuses == [PREEMPTED_EXIT] * len(statuses) and statuses, err[-3000:]
    # a whole checkpoint: the model, the optimizer, each process's RNG state, the trainer state at that step
    names = left[checkpoint.name]
    assert {
        "model.safetensors",
        "optimizer.pt",
        "rng_state_0.pth",
        "rng_state_1.pth",
        "trainer_state.json",
    } <= set(names)
    assert left[f"{checkpoint.name}/step"] == step
    # resumed to the end: the same as the uninterrupted two-node run, bit for bit
    assert _logs(one / f"checkpoint-{STEPS}") == _logs(two / f"checkpoint-{STEPS}")
    weights_two, weights_one = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    for name, tensor in weights_two.items():
        assert torch.equal(weights_one[name], tensor), name


# ---------------------------------------------------------------------------------------------
# the configs' multi-node flags, FSDP2 across two nodes


def _multinode_launch(name: str):
    """What `accelerate launch --config_file configs/NAME.yaml` with the multi-node flags starts on node 1 of 2 (as
    on GPU machines with 8 GPUs each): torchrun's arguments."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    flags = ["--num_machines", "2", "--num_processes", "16", "--machine_rank", "1"]
    flags += ["--main_process_ip", "10.1.2.3", "--main_process_port", "29500"]
    argv = ["--config_file", str(ROOT / "configs" / f"{name}.yaml"), *flags, "-m", "jetmoe_ft.sft"]
    args = launch_command_parser().parse_args(argv)
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=8),
    ):
        args, defaults, _ = _validate_launch_command(args)
        if args.use_deepspeed:
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
            command, _ = prepare_deepspeed_cmd_env(args)
            assert command is None, command  # torchrun on each node, not DeepSpeed's pdsh launcher
        else:
            prepare_multi_gpu_env(args)
    return args


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero2", "zero3"])
def test_every_gpu_config_takes_the_multinode_flags(name):
    args = _multinode_launch(name)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "10.1.2.3:29500")


def test_fsdp2_across_two_nodes_matches_one_process(tmp_path, one_process):  # noqa: F811
    port = str(_free_port())
    nodes = []
    for rank in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank)]
        command += ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]
        command += ["-m", "tests.test_distributed", "fsdp2", str(tmp_path)]
        nodes.append(
            subprocess.Popen(
                command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    status, _, err = _wait(nodes[0], 600)
    _wait(nodes[1], 120)  # its launcher may log a failed exit barrier when node 0's store closes first
    assert status == 0, err[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["local_expert_shape"] == [2, 192, 64]  # each node holds half of every expert weight
    assert len(list((tmp_path / "sharded").glob("*.distcp"))) == 2
    _assert_matches_one_process(result, tmp_path, one_process)


# ---------------------------------------------------------------------------------------------
# a lost rank on another node; output_dir and locks across nodes


class Helper:
    """A rank of one of this file's helpers, forked from the test process (which has imported everything already:
    a fresh interpreter would spend most of the test importing) with a rank's environment; its stdout and stderr
    go to files."""

    def __init__(self, task: str, env: dict[str, str], folder: Path, *args: str):
        import multiprocessing

        self.out, self.err = folder / f"rank-{env['RANK']}.out", folder / f"rank-{env['RANK']}.err"
        context = multiprocessing.get_context("fork")
        self.process = context.Process(
            target=_run_helper, args=(task, env, self.out, self.err, args), daemon=True
        )
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float) -> tuple[int, str, str]:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.err.read_text()[-3000:]}")
        return self.process.exitcode, self.out.read_text(), self.err.read_text()

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()


def _run_helper(task: str, env: dict[str, str], out: Path, err: Path, args: tuple[str, ...]) -> None:
    os.environ.update(env)
    sys.stdout, sys.stderr = open(out, "w", buffering=1), open(err, "w", buffering=1)
    HELPERS[task](*args)


def _helpers(task: str, ranks: list[tuple[int, int]], folder: Path, *args: str) -> list[Helper]:
    """Ranks (rank, node) of one run of a helper, with the rendezvous at a free port and a 2 s heartbeat timeout."""
    port = str(_free_port())
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(len(ranks))}
    env |= {"GROUP_WORLD_SIZE": str(len({node for _, node in ranks})), "JETMOE_FT_HEARTBEAT_TIMEOUT": "2"}
    folder.mkdir(parents=True, exist_ok=True)
    return [
        Helper(task, {**env, "RANK": str(rank), "GROUP_RANK": str(node), "LOCAL_RANK": "0"}, folder, *args)
        for rank, node in ranks
    ]


def test_a_rank_on_another_node_that_vanishes_is_reported(tmp_path):
    # rank 0 hosts the rendezvous store (as torchrun's agent on node 0 does); ranks 1 and 2 run on nodes 1 and 2
    main, vanishing, leaving = _helpers("watch", [(0, 0), (1, 1), (2, 2)], tmp_path / "logs", str(tmp_path))
    try:
        status, _, err = leaving.wait(120)  # ends normally after a few heartbeats
        assert status == 0, err[-3000:]
        time.sleep(3)  # longer than the heartbeat timeout: a rank that said goodbye is not lost
        assert main.poll() is None, main.err.read_text()[-3000:]
        os.kill(vanishing.pid, signal.SIGSTOP)  # its machine is gone: no exit, no closed socket
        status, _, err = main.wait(60)
    finally:
        for helper in (main, vanishing, leaving):
            helper.kill()
    assert status == LOST_PROCESS_EXIT, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(
        f"error: process rank 1 (pid {vanishing.pid}) on {socket.gethostname()} (node 1) of this run is gone "
        "(no heartbeat from its machine for "
    )
    assert lines[0].endswith("; resume as before.")


def test_an_output_dir_the_nodes_do_not_share_is_refused(tmp_path):
    shared, elsewhere = tmp_path / "shared", tmp_path / "node-1-disk"
    same = _helpers("shared", [(0, 0), (1, 1)], tmp_path / "same", str(shared), str(shared))
    assert [helper.wait(120)[0] for helper in same] == [0, 0]
    apart = _helpers("shared", [(0, 0), (1, 1)], tmp_path / "apart", str(shared), str(elsewhere))
    for helper, output_dir in zip(apart, (shared, elsewhere), strict=True):
        status, out, err = helper.wait(120)
        assert status == 2, err[-3000:]
        assert out.strip() == (  # every process stops with the same line, naming its own output_dir
            f"output_dir: {output_dir} is not shared between the nodes: node 1 ({socket.gethostname()}) cannot see "
            "what node 0 wrote there; put it on a file system every node mounts (checkpoints, the lock and "
            "resuming live there)."
        )


def test_save_on_each_node_is_refused_on_several_nodes(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="save_on_each_node: true .* set it false"):
        check_nodes_share(tmp_path, save_on_each_node=True)
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    check_nodes_share(tmp_path, save_on_each_node=True)  # one node: its own disk is the output_dir


def test_a_lock_taken_on_another_machine_holds_while_it_is_fresh(tmp_path, monkeypatch):
    from jetmoe_ft.training import provenance

    lock = tmp_path / provenance.LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "another-node"}))
    with pytest.raises(RecipeError, match=r"another run \(pid 1 on another-node\)"):
        provenance._take_lock(tmp_path)
    stale = time.time() - provenance.LOCK_STALE_S - 1
    os.utime(lock, (stale, stale))
    provenance._take_lock(tmp_path)  # its holder stopped touching it: taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    # a requeued SLURM job takes over the lock its earlier run left, however fresh
    lock.write_text(json.dumps({"pid": 1, "host": "another-node", "slurm_job": "77"}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    provenance._take_lock(tmp_path)
    assert json.loads(lock.read_text()) == {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slurm_job": "77",
    }


# ---------------------------------------------------------------------------------------------
# the helpers (each runs in a forked process with a rank's environment; see `Helper`)


def watch_helper(output_dir: str) -> None:
    """A rank that only watches its peers: rank 0 also hosts the rendezvous store; rank 2 ends after 1 s."""

    import torch.distributed as dist

    from jetmoe_ft.distributed import stop_watching, watch_processes

    rank = int(os.environ["RANK"])
    if rank == 0:
        store = dist.TCPStore(  # noqa: F841 (serves the others while this process lives)
            "127.0.0.1", int(os.environ["MASTER_PORT"]), is_master=True, wait_for_workers=False
        )
    watch_processes(output_dir, lambda: "resume as before.")
    time.sleep(1.0 if rank == 2 else 120)
    stop_watching()


def shared_helper(output_dir_node_0: str, output_dir_node_1: str) -> None:
    """`check_nodes_share` on a gloo group of the ranks; node 1 looks at its own path. Prints its error, exit 2."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    output_dir = output_dir_node_0 if os.environ["GROUP_RANK"] == "0" else output_dir_node_1
    try:
        check_nodes_share(output_dir, save_on_each_node=False)
    except RecipeError as error:
        print(error)
        sys.exit(2)
    finally:
        dist.destroy_process_group()


HELPERS = {"watch": watch_helper, "shared": shared_helper}


# ---------------------------------------------------------------------------------------------
# the SLURM batch script (SLURM is not installed here: `srun` and `scontrol` are stand-ins that run each node's
# command on this machine and record the requeue; `accelerate` is a stand-in that records what it was given)

SRUN = """#!/bin/bash
while [[ $1 == -* ]]; do shift; done  # srun's own options
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}"' USR1  # srun passes the signals it gets on to its tasks
for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
done
"""
SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; else echo "$@" >> "$RECORDS/scontrol"; fi
"""
LAUNCHER = """#!{python}
import json, os, signal, sys, time
warned = []
signal.signal(signal.SIGUSR1, lambda *_: warned.append(True))
record = {{"argv": sys.argv[1:], "node": os.environ["SLURM_NODEID"], "env": dict(os.environ)}}
path = os.path.join(os.environ["RECORDS"], "node-" + os.environ["SLURM_NODEID"])
open(path + ".tmp", "w").write(json.dumps(record)); os.replace(path + ".tmp", path)
deadline = time.monotonic() + 60
while not warned and time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(75 if warned else 1)
"""


def test_the_slurm_script_starts_one_launcher_per_node_and_requeues_on_the_warning(tmp_path):
    bin_dir, records = tmp_path / "bin", tmp_path / "records"
    bin_dir.mkdir()
    records.mkdir()
    for name, text in (
        ("srun", SRUN),
        ("scontrol", SCONTROL),
        ("accelerate", LAUNCHER.format(python=sys.executable)),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORDS": str(records), "GPUS_PER_NODE": "4"}
    env |= {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]"}
    script = ROOT / "configs" / "slurm" / "jetmoe-ft.sbatch"
    job = subprocess.Popen(
        ["bash", str(script), "dpo", "recipes/tiny/dpo.yaml", "--max_steps", "3"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(records.glob("node-?"))) < 2:
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1]
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@180` sends before the time limit
        _, _, err = _wait(job, 60)
    finally:
        if job.poll() is None:
            job.kill()
    assert "requeueing job 4242" in err, err
    assert (records / "scontrol").read_text() == "requeue 4242\n"
    for node in range(2):
        record = json.loads((records / f"node-{node}").read_text())
        assert record["argv"][:2] == ["launch", "--config_file"]
        flags = dict(zip(record["argv"][3:13:2], record["argv"][4:13:2], strict=True))
        assert flags == {
            "--num_machines": "2",
            "--num_processes": "8",
            "--machine_rank": str(node),
            "--main_process_ip": "node-a",
            "--main_process_port": str(20000 + 4242),
        }
        assert record["argv"][13:] == [
            "-m",
            "jetmoe_ft.dpo",
            "--config",
            "recipes/tiny/dpo.yaml",
            "--max_steps",
            "3",
        ]
        assert "SIGUSR1" in record["env"]["PET_SIGNALS_TO_HANDLE"].split(",")
        assert int(record["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < 180  # the checkpoint is written in time
