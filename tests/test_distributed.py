"""Multi-process training on 2 CPU ranks: DDP parity of every loop, FSDP2 and ZeRO-3 with our model, the
accelerate configs, and the scale-out helpers of `jetmoe_ft.distributed`.

The FSDP2 and ZeRO-3 runs start this file as their worker: `python -m torch.distributed.run --standalone
--nproc_per_node 2 -m tests.test_distributed {fsdp2|zero3} OUT`.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file

from jetmoe_ft import JetMoeConfig, JetMoeForCausalLM
from jetmoe_ft.config import RecipeError
from jetmoe_ft.distributed import (
    ZERO3_LEAF_CLASSES,
    check_launch,
    declare_zero3_leaf_modules,
    let_training_wrap_the_model,
    prepare_final_save,
)
from jetmoe_ft.modeling.modeling_jetmoe import JetMoeAttention, JetMoeDecoderLayer, JetMoeMoE

from .conftest import tiny_kwargs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
LEARNING_RATE = 1e-3
STEPS = 3


# ---------------------------------------------------------------------------------------------
# accelerate configs


def _launch_args(name: str):
    """What `accelerate launch --config_file configs/NAME.yaml` makes of the file (as on an 8-GPU machine)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "train.py"])
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=8),
    ):
        args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    return args, defaults, mixed_precision_from_config


def _plugin_from_launch(name: str):
    """The FSDP or DeepSpeed plugin each launched process builds from the launcher's environment, and
    that environment."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, mixed_precision_from_config = _launch_args(name)
    if args.use_fsdp:
        env = prepare_multi_gpu_env(args)
        with mock.patch.dict(os.environ, env):
            return FullyShardedDataParallelPlugin(), env
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        return DeepSpeedPlugin(), env


@pytest.mark.parametrize(
    "name, kind",
    [
        ("single", "one"),
        ("cpu_ddp", "ddp"),
        ("ddp", "ddp"),
        ("fsdp2", "fsdp"),
        ("zero2", "deepspeed"),
        ("zero3", "deepspeed"),
    ],
)
def test_every_config_says_how_to_launch_it_and_launches_that(name, kind):
    text = (CONFIGS / f"{name}.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert text.startswith("# ") and len(header) >= 2
    assert any(f"accelerate launch --config_file configs/{name}.yaml" in line for line in header)
    args, _, _ = _launch_args(name)
    launched = {"one": not (args.multi_gpu or args.use_fsdp or args.use_deepspeed)}
    launched |= {"ddp": args.multi_gpu, "fsdp": args.use_fsdp, "deepspeed": args.use_deepspeed}
    assert launched[kind], (name, args)
    assert (args.num_processes > 1) == (kind != "one")
    if kind in ("fsdp", "deepspeed"):
        # the recipe's `bf16:` decides the precision; a fixed one here would contradict `bf16: false`
        assert yaml.safe_load(text)["mixed_precision"] == "no"


def test_fsdp2_config_wraps_decoder_layers_and_saves_sharded_checkpoints():
    from accelerate.utils.dataclasses import get_module_class_from_name

    plugin, _ = _plugin_from_launch("fsdp2")
    assert plugin.fsdp_version == 2
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.reshard_after_forward is True
    (layer_name,) = plugin.transformer_cls_names_to_wrap
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs()))
    assert get_module_class_from_name(model, layer_name) is JetMoeDecoderLayer


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_configs_take_batch_sizes_from_the_recipe(stage):
    config = _plugin_from_launch(f"zero{stage}")[0].deepspeed_config
    assert config["zero_optimization"]["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", key
    # ZeRO-3's final export gathers the weights into one normal checkpoint
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (stage == 3)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (the `gpu` extra)")
def test_zero3_config_names_the_same_leaf_modules_as_the_loader():
    import deepspeed.utils

    plugin, env = _plugin_from_launch("zero3")
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs()))
    with mock.patch.dict(os.environ, env):  # read when accelerate prepares the model
        plugin.set_moe_leaf_modules(model)
    flagged = {type(module) for module in deepspeed.utils.get_z3_leaf_modules(model)}
    assert flagged == set(ZERO3_LEAF_CLASSES)


# ---------------------------------------------------------------------------------------------
# jetmoe_ft.distributed


def _leaf_names(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.{part}" for i in range(num_layers) for part in ("mlp", "self_attention")]


def test_zero3_leaf_modules_are_the_moa_attention_and_moe_blocks():
    model = JetMoeForCausalLM(JetMoeConfig(**tiny_kwargs(num_hidden_layers=3)))
    with mock.patch("jetmoe_ft.distributed.is_deepspeed_zero3_enabled", return_value=False):
        assert declare_zero3_leaf_modules(model) == []
    assert not any(getattr(module, "_z3_leaf", False) for module in model.modules())

    with mock.patch("jetmoe_ft.distributed.is_deepspeed_zero3_enabled", return_value=True):
        if HAS_DEEPSPEED:
            names = declare_zero3_leaf_modules(model)
        else:
            with mock.patch.dict(
                sys.modules, {"deepspeed": mock.MagicMock(), "deepspeed.utils": mock.MagicMock()}
            ):
                declare_zero3_leaf_modules(model)
                setter = sys.modules["deepspeed.utils"].set_z3_leaf_modules
                setter.assert_called_once_with(model, [JetMoeAttention, JetMoeMoE])
            return
    assert sorted(names) == sorted(_leaf_names(3))
    import deepspeed.utils

    leaves = deepspeed.utils.get_z3_leaf_modules(model)
    assert len(leaves) == 6 and {type(module) for module in leaves} == {JetMoeAttention, JetMoeMoE}


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_launches_without_a_gpu_are_refused(variable):
    with mock.patch.dict(os.environ, {variable: "true"}):
        with pytest.raises(RecipeError, match="needs GPUs.*configs/cpu_ddp.yaml"):
            check_launch(cuda_available=False)
        check_launch(cuda_available=True)
    with mock.patch.dict(os.environ, {variable: "false"}):
        check_launch(cuda_available=False)


def test_final_save_under_fsdp_switches_to_a_full_state_dict():
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    trainer = SimpleNamespace(
        is_fsdp_enabled=True, accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    )
    assert prepare_final_save(trainer) is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert prepare_final_save(trainer) is False
    assert prepare_final_save(SimpleNamespace(is_fsdp_enabled=False)) is False


def test_evaluation_before_training_leaves_the_ddp_wrap_to_training():
    model = torch.nn.Linear(2, 2)
    model._is_accelerate_prepared = True  # what accelerate's evaluation-only preparation leaves behind

    def trainer(processes: int, wrapped=model, **flags):
        accelerator = SimpleNamespace(num_processes=processes)
        return SimpleNamespace(model=model, model_wrapped=wrapped, accelerator=accelerator, **flags)

    assert let_training_wrap_the_model(trainer(1)) is False
    assert let_training_wrap_the_model(trainer(2, is_fsdp_enabled=True)) is False
    assert let_training_wrap_the_model(trainer(2, wrapped=torch.nn.Identity())) is False
    assert model._is_accelerate_prepared
    assert let_training_wrap_the_model(trainer(2)) is True
    assert not model._is_accelerate_prepared


# ---------------------------------------------------------------------------------------------
# DDP on 2 CPU ranks: the same global batch gives the same training as one process

PARITY = [
    # plain SGD, constant rate: updates are linear in the gradients, so rank-averaged gradients show in the
    # weights; the router loss is left out since it is computed per micro-batch (per rank)
    *("--optim", "sgd", "--learning_rate", "0.05", "--lr_scheduler_type", "constant", "--warmup_steps", "0"),
    *("--aux_loss_coef", "0", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"),
    *("--logging_steps", "1", "--report_to", "none", "--seed", "7"),
]


@pytest.fixture
def one_thread():
    """The one-process runs on one thread, like each rank: tiny models only lose time to more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _launch_two_ranks(module: str, argv: list[str]) -> str:
    command = [str(Path(sys.executable).parent / "accelerate"), "launch"]
    command += ["--config_file", str(CONFIGS / "cpu_ddp.yaml"), "-m", module, *argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes (cpu)" in result.stdout
    return result.stdout


def _train_logs(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def _assert_same_training(one: Path, two: Path, atol: float = 1e-5) -> None:
    logs_one, logs_two = _train_logs(one), _train_logs(two)
    assert len(logs_one) == len(logs_two) == 2
    for a, b in zip(logs_one, logs_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    assert all(entry["grad_norm"] > 0 for entry in logs_one)
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, atol=atol, rtol=1e-4, msg=name)


def test_sft_on_two_ranks_matches_one_process_on_the_same_global_batch(tmp_path, one_thread):
    from jetmoe_ft.sft import main as sft_main

    recipe = str(ROOT / "recipes" / "tiny" / "sft.yaml")
    common = ["--config", recipe, "--max_length", "64", "--max_eval_samples", "8", *PARITY]
    _launch_two_ranks(
        "jetmoe_ft.sft",
        [*common, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2"],
    )
    sft_main([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"])
    _assert_same_training(tmp_path / "one", tmp_path / "two")
    # the checkpoint and the export are ordinary single-model files
    assert JetMoeForCausalLM.from_pretrained(tmp_path / "two" / "checkpoint-2").config.num_hidden_layers == 4


def test_dpo_on_two_ranks_matches_one_process_on_the_same_global_batch(tmp_path, one_thread):
    from jetmoe_ft.dpo import main as dpo_main

    recipe = str(ROOT / "recipes" / "tiny" / "dpo.yaml")
    common = ["--config", recipe, "--model_name_or_path", "jetmoe-ft/tiny", "--max_length", "32"]
    common += ["--max_train_samples", "32", "--max_eval_samples", "4", *PARITY]
    _launch_two_ranks(
        "jetmoe_ft.dpo",
        [*common, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2"],
    )
    dpo_main([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"])
    _assert_same_training(tmp_path / "one", tmp_path / "two")


def test_classifier_on_two_ranks_matches_one_process_on_the_same_global_batch(tmp_path, one_thread):
    from jetmoe_ft.cls import main as cls_main

    recipe = str(ROOT / "recipes" / "tiny" / "cls.yaml")
    common = ["--config", recipe, "--max_length", "32", "--max_eval_samples", "8"]
    common += ["--max_train_samples", "32", *PARITY]
    _launch_two_ranks(
        "jetmoe_ft.cls",
        [*common, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "4"],
    )
    cls_main([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8"])
    _assert_same_training(tmp_path / "one", tmp_path / "two")


# ---------------------------------------------------------------------------------------------
# FSDP2 and ZeRO-3 with our model on 2 CPU ranks (gloo), against one process on the whole batch


def _config() -> JetMoeConfig:
    return JetMoeConfig(**tiny_kwargs())


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (4, 16), generator=generator) for _ in range(STEPS)]


def _fresh_model() -> JetMoeForCausalLM:
    torch.manual_seed(0)
    return JetMoeForCausalLM(_config())


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, output_router_logits=False).loss


@pytest.fixture(scope="module")
def one_process():
    """Losses and final weights of `STEPS` AdamW steps on the whole batches, in one process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = _fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    losses = []
    for ids in _batches():
        loss = _loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    torch.set_num_threads(threads)
    return losses, {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _torchrun(worker: str, output_dir: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "tests.test_distributed", worker, str(output_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads((output_dir / "result.json").read_text())


def _assert_matches_one_process(result: dict, output_dir: Path, one_process) -> None:
    losses, weights = one_process
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    for export in ("final", "resumed"):
        model = JetMoeForCausalLM.from_pretrained(output_dir / export)  # a normal checkpoint
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, weights[name], atol=1e-5, rtol=1e-4, msg=f"{export}: {name}")


def test_fsdp2_on_two_cpu_ranks_matches_one_process(tmp_path, one_process):
    result = _torchrun("fsdp2", tmp_path)
    # every expert weight [E, out, in] is split across the ranks along the expert dimension
    assert result["local_expert_shape"] == [2, 192, 64]
    shards = sorted(path.name for path in (tmp_path / "sharded").glob("*.distcp"))
    assert len(shards) == 2, shards
    _assert_matches_one_process(result, tmp_path, one_process)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (the `gpu` extra)")
def test_zero3_on_two_cpu_ranks_with_leaf_modules_matches_one_process(tmp_path, one_process):
    result = _torchrun("zero3", tmp_path)
    assert sorted(result["leaves"]) == sorted(_leaf_names(2))
    assert (tmp_path / "deepspeed" / "latest").is_file()
    _assert_matches_one_process(result, tmp_path, one_process)


# ---------------------------------------------------------------------------------------------
# bench/gpu_check.sh: fails clearly without CUDA; its checks run on CPU with --dry-run


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def _gpu_check(*args: str) -> tuple[int, list[dict]]:
    env = {**os.environ, "PYTHON": sys.executable}
    command = ["bash", str(ROOT / "bench" / "gpu_check.sh"), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]  # JSON lines only


def test_gpu_benchmark_model_is_about_a_billion_parameters():
    gpu_check = _gpu_check_module()
    tiny = JetMoeForCausalLM(JetMoeConfig(**gpu_check.TINY_CONFIG))
    assert gpu_check.count_parameters(gpu_check.TINY_CONFIG) == sum(p.numel() for p in tiny.parameters())
    assert 0.9e9 < gpu_check.count_parameters(gpu_check.GPU_BENCH_CONFIG) < 1.2e9
    assert gpu_check.settings_for(dry_run=False).bench_batch == (8, 2048)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_gpu_check_without_cuda_says_so_and_installs_nothing():
    code, records = _gpu_check()
    assert code == 2
    assert records == [
        {"check": "environment", "status": "fail", "error": pytest.approx(records[0]["error"])}
    ]
    assert "no CUDA device" in records[0]["error"] and "--dry-run" in records[0]["error"]


def test_gpu_check_dry_run_runs_every_check_on_cpu():
    code, records = _gpu_check("--dry-run")
    statuses = {record["check"]: record["status"] for record in records}
    assert list(statuses) == list(_gpu_check_module().CHECKS)
    assert code == 0, records
    assert statuses["flash_vs_sdpa"] == "skipped"  # no CUDA, no flash-attn here
    for name in ("environment", "padding_free", "backend_parity", "train_throughput"):
        assert statuses[name] == "ok", name
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    assert statuses["qlora_step"] == ("ok" if has_bnb else "skipped")
    throughput = records[-1]
    assert throughput["ours_tokens_per_s"] > 0 and throughput["same_first_loss"]


# ---------------------------------------------------------------------------------------------
# The workers (each runs on every rank)


def _local(ids: torch.Tensor) -> torch.Tensor:
    """This rank's half of a global batch (equal halves: the mean of the rank losses is the global mean)."""
    import torch.distributed as dist

    half = ids.shape[0] // dist.get_world_size()
    return ids[dist.get_rank() * half : (dist.get_rank() + 1) * half]


def _mean_over_ranks(value: torch.Tensor) -> float:
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def _save_export(state_dict: dict | None, path: Path) -> None:
    """Rank 0 writes a gathered full state dict as an ordinary `save_pretrained` directory."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        model = JetMoeForCausalLM(_config())
        model.load_state_dict(state_dict)
        model.save_pretrained(path)
    dist.barrier()


def fsdp2_worker(output_dir: Path) -> None:
    """FSDP2 as configs/fsdp2.yaml asks: every decoder layer and the root sharded; a sharded checkpoint
    after step 2 (model + optimizer, torch.distributed.checkpoint), resumed in a fresh sharded model."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    def sharded():
        model = _fresh_model()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)

    def step(model, optimizer, ids):
        loss = _loss(model, _local(ids))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return _mean_over_ranks(loss)

    def export(model, name):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        _save_export(get_model_state_dict(model, options=options), output_dir / name)

    dist.init_process_group("gloo")
    batches = _batches()
    model, optimizer = sharded()
    expert_shape = list(model.model.layers[0].mlp.input_linear.weight.to_local().shape)
    losses = [step(model, optimizer, ids) for ids in batches[:-1]]
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=output_dir / "sharded")
    losses.append(step(model, optimizer, batches[-1]))
    export(model, "final")

    resumed, resumed_optimizer = sharded()
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=output_dir / "sharded")
    set_state_dict(
        resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    step(resumed, resumed_optimizer, batches[-1])
    export(resumed, "resumed")
    if dist.get_rank() == 0:
        result = {"losses": losses, "local_expert_shape": expert_shape}
        (output_dir / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def zero3_worker(output_dir: Path) -> None:
    """DeepSpeed ZeRO-3 with the loader's leaf modules; a DeepSpeed checkpoint after step 2, resumed in a
    fresh engine; exports gathered as configs/zero3.yaml asks (16-bit gather, here fp32 weights)."""
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told; the one-process run does not clip
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": LEARNING_RATE, "weight_decay": 0.0, "torch_adam": True},
        },
        "steps_per_print": 10**9,
    }
    hf_config = HfDeepSpeedConfig(ds_config)  # what the Trainer holds: is_deepspeed_zero3_enabled() is True
    deepspeed.init_distributed(dist_backend="gloo")

    def engine():
        model = _fresh_model()
        leaves = declare_zero3_leaf_modules(model)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        return engine, leaves

    def step(engine, ids):
        loss = _loss(engine, _local(ids))
        engine.backward(loss)
        engine.step()
        return _mean_over_ranks(loss)

    batches = _batches()
    first, leaves = engine()
    losses = [step(first, ids) for ids in batches[:-1]]
    first.save_checkpoint(str(output_dir / "deepspeed"))
    losses.append(step(first, batches[-1]))
    _save_export(first._zero3_consolidated_16bit_state_dict(), output_dir / "final")

    second, _ = engine()
    second.load_checkpoint(str(output_dir / "deepspeed"))
    step(second, batches[-1])
    _save_export(second._zero3_consolidated_16bit_state_dict(), output_dir / "resumed")
    if dist.get_rank() == 0:
        (output_dir / "result.json").write_text(json.dumps({"losses": losses, "leaves": leaves}))
    del hf_config


WORKERS = {"fsdp2": fsdp2_worker, "zero3": zero3_worker}

if __name__ == "__main__":
    torch.set_num_threads(1)
    WORKERS[sys.argv[1]](Path(sys.argv[2]))
