"""`jetmoe-ft export`: every kind of run output, fp32 and bf16, through checks 1-4 for real (one fresh process for the
session, which cannot import jetmoe_ft), broken merges and packings refused by the check that should catch them, bad
inputs as one line each, and `transformers serve` answering like our own greedy generation."""

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments
from trl import SFTConfig

from jetmoe_ft.adapters.adapt import adapt_model
from jetmoe_ft.assets import build_tiny_model, load_tokenizer
from jetmoe_ft.cls import ClsArguments
from jetmoe_ft.config import RecipeError, parse_recipe
from jetmoe_ft.export import peft_format, pipeline, probes
from jetmoe_ft.export.checks import ExportRefused, FreshProcess
from jetmoe_ft.export.command import cli
from jetmoe_ft.loading import load_recipe_model, load_recipe_tokenizer
from jetmoe_ft.modeling import JetMoeForSequenceClassification
from jetmoe_ft.training.runs import finish_head_run, finish_run

from .conftest import randomize_biases, tiny_kwargs

SHAPE = tiny_kwargs(vocab_size=32000)  # the embedded tokenizer's vocabulary
LORA = {"lora_r": 4, "lora_alpha": 8}


def _save_run(root, name, values, *, cls=None, task=None, perturb="lora_B"):
    """A run directory written by the loops' own save path (`finish_run` / `finish_head_run`), from the real recipe
    parser, loader and `adapt_model`; training replaced by random non-zero LoRA B (or weights, for a full model)."""
    output = root / name
    config = root / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump({"output_dir": str(output), "report_to": "none", "bf16": False, **values})
    )
    argv = ["--config", str(config)]
    recipe = parse_recipe(TrainingArguments, argv, ClsArguments) if cls else parse_recipe(SFTConfig, argv)
    tokenizer = load_recipe_tokenizer(recipe)
    kwargs = {}
    if cls:
        labels = ["negative", "positive"] if task == "classifier" else None
        kwargs = (
            {"num_labels": 1} if labels is None else {"num_labels": 2, "id2label": dict(enumerate(labels))}
        )
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    model = load_recipe_model(recipe, cls, **kwargs) if cls else load_recipe_model(recipe)
    model = adapt_model(recipe, model, task_type="SEQ_CLS" if cls else "CAUSAL_LM")
    generator = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            expert = parameter_name.endswith(("input_linear.weight", "output_linear.weight"))
            if (perturb == "lora_B" and "lora_B" in parameter_name) or (perturb == "experts" and expert):
                parameter.add_(
                    torch.randn(parameter.shape, generator=generator) * (0.2 if perturb == "lora_B" else 0.05)
                )
            if parameter_name.endswith("score.weight") or "score.modules_to_save" in parameter_name:
                parameter.normal_(0, 0.1, generator=generator)
    trainer = Trainer(model=model, args=TrainingArguments(str(output), report_to=[]))
    (finish_head_run if cls else finish_run)(trainer, recipe, tokenizer, {"eval_after_loss": 1.0}, [])
    return output


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base = build_tiny_model(0, **SHAPE)
    randomize_biases(base)
    base.save_pretrained(root / "base")
    load_tokenizer().save_pretrained(root / "base")
    start = {"model_name_or_path": str(root / "base"), "dataset_name": "chatterbot"}
    made = {"base": root / "base"}
    made["adapter"] = _save_run(
        root, "adapter", {**start, **LORA, "lora_targets": ["moa_experts", "moe_experts", "kv_proj"]}
    )
    made["subset"] = _save_run(  # experts chosen per router, routers trained whole, the head trained and tied
        root,
        "subset",
        {
            **start,
            **LORA,
            "lora_targets": ["moe_experts", "lm_head"],
            "lora_experts": {0: [1, 3], 1: [2]},
            "freeze_router": "none",
        },
    )
    made["full"] = _save_run(root, "full", {**start, "freeze_router": "moa"}, perturb="experts")
    made["stacked"] = _save_run(
        root,
        "stacked",
        {**start, **LORA, "model_name_or_path": str(made["adapter"]), "lora_targets": ["moe_experts"]},
    )
    made["qlora"] = _save_run(
        root, "qlora", {**start, **LORA, "load_in_4bit": True, "lora_targets": ["moe_experts", "kv_proj"]}
    )
    made["classifier"] = _save_run(
        root,
        "classifier",
        {**start, **LORA, "lora_targets": ["moe_experts"]},
        cls=JetMoeForSequenceClassification,
        task="classifier",
    )
    made["reward"] = _save_run(
        root,
        "reward",
        {**start, "freeze_router": "all"},
        cls=JetMoeForSequenceClassification,
        task="reward",
        perturb="experts",
    )
    return made


@pytest.fixture(scope="session")
def fresh():
    with FreshProcess(threads=1) as process:
        yield process


PEFT_KINDS = ("adapter", "subset", "classifier")
KINDS = ("adapter", "subset", "full", "stacked", "qlora", "classifier", "reward")


@pytest.fixture(scope="session")
def exports(runs, fresh, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    done = {}
    for kind in KINDS:
        for dtype in ("fp32", "bf16"):
            kwargs = {}
            if kind in PEFT_KINDS:
                kwargs = {"peft_adapter": True, "base": str(runs["base"])}
            done[kind, dtype] = pipeline.export_run(
                runs[kind], root / f"{kind}-{dtype}", dtype=dtype, max_shard_size="1MB", fresh=fresh, **kwargs
            )
    return done


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_output_kind_passes_checks_1_to_4(exports, kind, dtype):
    folder = exports[kind, dtype]
    info = json.loads((folder / "export.json").read_text())
    names = [check["check"] for check in info["checks"]]
    assert names == ["1 fine-tune present", "2 tensors", "3 fresh load"] + (
        ["4 stock peft"] if kind in PEFT_KINDS else []
    )
    assert all(check["passed"] for check in info["checks"])
    fresh_load = info["checks"][2]
    assert fresh_load["jetmoe_ft_importable"] is False
    assert fresh_load["model_class"].startswith("transformers.models.jetmoe.")
    assert fresh_load["router_topk_agreement_min"] >= 0.999 and fresh_load["template_ids_identical"]
    if dtype == "fp32":
        assert fresh_load["max_abs_error"] <= 1e-4
    if kind not in ("classifier", "reward"):
        assert fresh_load["greedy_identical"] and fresh_load["greedy_positions"] > 0
    assert (
        fresh_load["snippet_output_identical"] or dtype == "bf16"
    )  # bf16 generation: a tie may flip (reported)
    tensors = info["checks"][1]
    assert (
        tensors["trained"] > 0
        and tensors["untouched_bit_identical"] + tensors["trained"] == tensors["tensors"]
    )
    assert (
        info["written"]["index"] and info["written"]["shards"] > 1
    )  # 1MB shards: an index like a large model's
    config = json.loads((folder / "config.json").read_text())
    assert not {"moe_backend", "router_z_loss_coef", "quantization"} & set(config)
    card = (folder / "README.md").read_text()
    assert (
        "library_name: transformers" in card and "base_model" not in card.split("---")[1]
    )  # a local base: none
    assert info["versions"]["transformers"] and (folder / "probe.safetensors").is_file()
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    if kind == "qlora":
        assert info["qlora"]["quant_type"] == "nf4" and "max_abs_logit_difference" in info["qlora"]
        assert "4-bit" in card
    if kind == "full":
        assert tensors["frozen_bit_identical"] == SHAPE["num_hidden_layers"]  # freeze_router: moa
    if kind in PEFT_KINDS:
        peft = info["checks"][3]
        assert peft["merge_elements"] > 0 and peft["adapter_tensors_loaded"] > 0
        stock = json.loads((folder / "adapter" / "adapter_config.json").read_text())
        assert stock["target_parameters"] and stock["lora_dropout"] == 0.0


def test_stock_adapter_packing_is_rank_major():
    a = torch.arange(2 * 3 * 5.0).reshape(2, 3, 5)  # [E, r, in]
    b = torch.arange(2 * 4 * 3.0).reshape(2, 4, 3)  # [E, out, r]
    packed_a = peft_format.pack_factor("x.lora_A.weight", a)
    packed_b = peft_format.pack_factor("x.lora_B.weight", b)
    # PEFT's own reading (ParamWrapper.get_delta_weight): A (E, r, in), B (out, r, E)
    assert torch.equal(packed_a.reshape(2, 3, 5), a)
    assert torch.equal(packed_b.reshape(4, 3, 2).permute(2, 0, 1), b)


def _swap_b(folder, runs, name, broken):
    """Rewrite the merged `name` in `folder` as a broken merge would: experts 0 and 1 with each other's B
    (`swap`), or expert 0 with no delta (`drop`)."""
    adapter = load_file(str(runs["adapter"] / "adapter_model.safetensors"))
    factor_a = adapter[f"base_model.model.{name}.lora_A.weight"]
    factor_b = adapter[f"base_model.model.{name}.lora_B.weight"]
    base = load_file(str(runs["base"] / "model.safetensors"))[f"{name}.weight"]
    file = next(f for f in folder.glob("model*.safetensors") if f"{name}.weight" in load_file(str(f)))
    tensors = load_file(str(file))
    weight = tensors[f"{name}.weight"].clone()
    if broken == "swap":
        weight[0] = base[0] + 2.0 * factor_b[1] @ factor_a[0]
        weight[1] = base[1] + 2.0 * factor_b[0] @ factor_a[1]
    else:
        weight[0] = base[0]
    tensors[f"{name}.weight"] = weight
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("broken", ["swap", "drop"])
def test_broken_merge_is_refused_by_check_2(runs, fresh, tmp_path, monkeypatch, broken):
    real_write = pipeline.merge.write_model

    def broken_write(model, tokenizer, folder, dtype, max_shard_size):
        written = real_write(model, tokenizer, folder, dtype, max_shard_size)
        _swap_b(folder, runs, "model.layers.1.mlp.input_linear", broken)
        return written

    monkeypatch.setattr(pipeline.merge, "write_model", broken_write)
    with pytest.raises(
        ExportRefused, match=r"check 2 tensors: model.layers.1.mlp.input_linear.weight\[expert [01]\]"
    ):
        pipeline.export_run(runs["adapter"], tmp_path / "out", dtype="fp32", fresh=fresh)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_expert_major_packing_is_refused_by_check_4(runs, fresh, tmp_path, monkeypatch):
    rank_major = peft_format.pack_factor

    def expert_major(key, value):  # unsloth #6930: B [E, out, r] -> [out, E*r], expert slowest
        if value.ndim == 3 and ".lora_B." in key:
            return value.permute(1, 0, 2).reshape(value.shape[1], -1).contiguous()
        return rank_major(key, value)

    monkeypatch.setattr(peft_format, "pack_factor", expert_major)
    with pytest.raises(ExportRefused, match=r"check 4 stock peft: peft logits"):
        pipeline.export_run(
            runs["adapter"],
            tmp_path / "out",
            dtype="fp32",
            peft_adapter=True,
            base=str(runs["base"]),
            fresh=fresh,
        )
    assert not list(tmp_path.iterdir())


def test_an_adapter_that_changes_nothing_is_refused_by_check_1(runs, tmp_path, capsys):
    noop = tmp_path / "noop"
    shutil.copytree(runs["adapter"], noop)
    tensors = load_file(str(noop / "adapter_model.safetensors"))
    tensors = {key: torch.zeros_like(value) if "lora_B" in key else value for key, value in tensors.items()}
    save_file(tensors, str(noop / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()  # an empty DIR given on purpose: still empty after the refusal
    assert cli(["--model", str(noop), "--output", str(out), "--dtype", "fp32"]) == 5
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert re.match(
        r"error: export refused by check 1 fine-tune present: the run's logits differ .* by 0,", errors[0]
    )
    assert not list(out.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["noop", "out"]


def _one_line_exit_2(capsys, argv):
    assert cli(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1  # one line (transformers' progress bars aside)
    return lines[0]


def test_bad_inputs_are_one_line_exit_2(runs, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "is not a run directory" in _one_line_exit_2(capsys, ["--model", str(tmp_path), "--output", out])
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    assert "already holds files" in _one_line_exit_2(
        capsys, ["--model", str(runs["adapter"]), "--output", str(occupied)]
    )
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(runs["adapter"], no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    assert "has no tokenizer" in _one_line_exit_2(capsys, ["--model", str(no_tokenizer), "--output", out])
    lost_base = tmp_path / "lost-base"
    shutil.copytree(runs["adapter"], lost_base)
    config = json.loads((lost_base / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (lost_base / "adapter_config.json").write_text(json.dumps(config))
    assert "cannot be found" in _one_line_exit_2(capsys, ["--model", str(lost_base), "--output", out])
    assert "--base" in _one_line_exit_2(
        capsys, ["--model", str(runs["stacked"]), "--output", out, "--peft_adapter"]
    )
    assert "not a Hub repo id" in _one_line_exit_2(
        capsys, ["--model", str(runs["adapter"]), "--output", out, "--push_to_hub", "no/such/repo"]
    )
    assert not (tmp_path / "out").exists()


def test_nan_model_and_mismatched_adapter_are_one_line_exit_2(runs, tmp_path, capsys):
    nan = tmp_path / "nan"
    shutil.copytree(runs["full"], nan)
    tensors = load_file(str(nan / "model.safetensors"))
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, str(nan / "model.safetensors"), metadata={"format": "pt"})
    assert "NaN or Inf weights" in _one_line_exit_2(
        capsys, ["--model", str(nan), "--output", str(tmp_path / "a")]
    )
    other = tmp_path / "other-base"
    build_tiny_model(0, **{**SHAPE, "intermediate_size": 64}).save_pretrained(other)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(runs["adapter"], mismatched)
    config = json.loads((mismatched / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(other)
    (mismatched / "adapter_config.json").write_text(json.dumps(config))
    assert "does not fit its base" in _one_line_exit_2(
        capsys, ["--model", str(mismatched), "--output", str(tmp_path / "b")]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mismatched", "nan", "other-base"]


def test_full_disk_is_one_line_and_leaves_nothing(runs, tmp_path, capsys):
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))\n"
        "from jetmoe_ft.export.command import cli\n"
        f"sys.exit(cli(['--model', {str(runs['adapter'])!r}, '--output', {str(tmp_path / 'out')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --output: no space left") and "nothing was written" in last
    assert not list(tmp_path.iterdir())


def test_push_to_hub_offline_fails_after_the_checks_naming_the_repo(
    runs, exports, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "pushed"
    code = cli(
        ["--model", str(runs["adapter"]), "--output", str(out), "--push_to_hub", "someone/tiny-export"]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1
    error = errors[0]
    assert "could not upload to someone/tiny-export" in error and "nothing was sent" in error
    assert (out / "export.json").is_file()  # the checks passed first: the verified export stays


def test_transformers_serve_answers_like_our_greedy_generation(exports):
    folder = exports["adapter", "fp32"]
    probe = load_file(str(folder / "probe.safetensors"))
    from transformers import AutoTokenizer

    expected = (
        AutoTokenizer.from_pretrained(str(folder)).decode(probe["0/greedy"], skip_special_tokens=True).strip()
    )
    server = subprocess.Popen(
        [
            str(__import__("pathlib").Path(sys.executable).with_name("transformers")),
            "serve",
            str(folder),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 180
        for line in server.stdout:
            match = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
            assert time.monotonic() < deadline
        assert port, "the server did not start"
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.chat.completions.create(
            model=str(folder),
            messages=[{"role": "user", "content": "Hello, how are you?"}],
            max_tokens=probes.GREEDY_TOKENS,
            temperature=0,
        )
        assert reply.choices[0].message.content.strip() == expected
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_push_to_hub_in_a_training_recipe_points_at_export(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model_name_or_path: jetmoe-ft/tiny\ndataset_name: chatterbot\nbf16: false\npush_to_hub: true\n"
    )
    with pytest.raises(
        RecipeError, match=r"^push_to_hub: .*jetmoe-ft export --model OUTPUT_DIR --output DIR --push_to_hub"
    ):
        parse_recipe(SFTConfig, ["--config", str(recipe), "--output_dir", str(tmp_path / "o")])
