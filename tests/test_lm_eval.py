"""The lm-evaluation-harness adapter: a local log-likelihood task and a local generation task over a jsonl file."""

import json

import pytest

pytest.importorskip("lm_eval")

from jetmoe_ft.evaluation.eval_gen import cli  # noqa: E402
from jetmoe_ft.evaluation.lm_eval_model import JetMoeLM, check_tasks, run_tasks  # noqa: E402

from .test_eval_gen import runs  # noqa: E402, F401  (the saved models)

ROWS = [
    {
        "question": "Hello, how are you?",
        "choices": ["I am fine.", "Purple tables."],
        "answer": 0,
        "target": "I am fine.",
    },
    {
        "question": "What is AI?",
        "choices": ["Artificial intelligence.", "A fish."],
        "answer": 0,
        "target": "Yes.",
    },
    {"question": "Do you like music?", "choices": ["Yes.", "Seven."], "answer": 1, "target": "Yes."},
]
COMMON = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
TASKS = {
    "jetmoe_local_ll": 'output_type: multiple_choice\ndoc_to_text: "{{question}}\\n"\ndoc_to_choice: "{{choices}}"\n'
    'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n',
    "jetmoe_local_gen": 'output_type: generate_until\ndoc_to_text: "{{question}}\\n"\ndoc_to_target: "{{target}}"\n'
    'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n',
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}\n" + COMMON.format(data=data) + body)
    return folder


def test_local_tasks_run_on_a_trained_directory(runs, tasks):  # noqa: F811
    lm = JetMoeLM(str(runs / "tuned"), batch_size=4, device="cpu")
    # log-likelihoods are our model's: the harness scores each choice by the model's token log-probabilities
    ((ll, greedy),) = lm.loglikelihood([_request("Hello, how are you?\n", "I am fine.")])
    assert ll < 0 and isinstance(greedy, bool)
    args = type(
        "Args", (), {"batch_size": 4, "lm_eval_include_path": str(tasks), "lm_eval_limit": None, "seed": 0}
    )
    results = run_tasks(lm.model, lm.tokenizer, ["jetmoe_local_ll", "jetmoe_local_gen"], args)
    assert 0.0 <= results["jetmoe_local_ll"]["acc,none"] <= 1.0
    assert 0.0 <= results["jetmoe_local_gen"]["exact_match,none"] <= 1.0


def _request(context: str, continuation: str):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)


def test_eval_gen_runs_harness_tasks_on_both_models(runs, tasks, tmp_path):  # noqa: F811
    from jetmoe_ft.evaluation.eval_gen import main

    report = main(
        ["--model", str(runs / "tuned"), "--no_instructions", "--max_samples", "2", "--max_new_tokens", "2"]
        + ["--bootstrap", "10", "--lm_eval_tasks", "jetmoe_local_ll", "--lm_eval_include_path", str(tasks)]
        + ["--output_dir", str(tmp_path / "out")]
    )
    assert set(report["lm_eval"]) == {"baseline", "fine-tuned"}
    assert "acc,none" in report["lm_eval"]["fine-tuned"]["jetmoe_local_ll"]


def test_unknown_task_is_one_line_before_loading(runs, tasks, capsys):  # noqa: F811
    assert check_tasks(["jetmoe_local_ll"], str(tasks)) == ["jetmoe_local_ll"]
    argv = [
        "--model",
        str(runs / "tuned"),
        "--lm_eval_tasks",
        "no_such_task_xyz",
        "--lm_eval_include_path",
        str(tasks),
    ]
    assert cli(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown lm-eval task no_such_task_xyz" in errors[0]


def test_jetmoe_ft_lm_eval_is_the_harness_command_with_our_model(runs, tasks, tmp_path, monkeypatch):  # noqa: F811
    from jetmoe_ft.cli import main

    monkeypatch.setattr("sys.argv", ["jetmoe-ft"])  # restored after: `jetmoe-ft lm-eval` rewrites sys.argv
    argv = ["lm-eval", "run", "--model", "jetmoe-ft", "--model_args", f"pretrained={runs / 'tuned'}"]
    argv += [
        "--tasks",
        "jetmoe_local_ll",
        "--include_path",
        str(tasks),
        "--batch_size",
        "2",
        "--device",
        "cpu",
    ]
    assert main(argv + ["--output_path", str(tmp_path / "results")]) == 0
    (result,) = tmp_path.rglob("results_*.json")
    assert 0.0 <= json.loads(result.read_text())["results"]["jetmoe_local_ll"]["acc,none"] <= 1.0


def test_lm_eval_without_the_extra_is_one_line(monkeypatch, capsys):
    import sys

    from jetmoe_ft.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval.api.registry", None)  # as if `lm-eval` were not installed
    monkeypatch.delitem(sys.modules, "jetmoe_ft.evaluation.lm_eval_model")
    assert main(["lm-eval", "run", "--tasks", "x"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == 'error: lm-evaluation-harness is not installed: pip install -e ".[eval]"'
    )
