"""KTO and ORPO on 2 CPU ranks (DDP, gloo): the same global batch trains as one process does.

The harness is the DPO one (`tests/test_distributed.py`): plain SGD at a constant rate, router loss off, two
steps, losses, gradient norms and final weights compared.
"""

import json

from datasets import Dataset, DatasetDict

from .test_distributed import PARITY, ROOT, _assert_same_training, _launch_two_ranks, one_thread  # noqa: F401

COMMON = ["--model_name_or_path", "jetmoe-ft/tiny", "--max_length", "32", "--max_eval_samples", "4", *PARITY]


def test_kto_on_two_ranks_matches_one_process_on_the_same_global_batch(tmp_path, one_thread):  # noqa: F811
    """KTO's KL estimate pairs each prompt with another row's completion: within the global batch on both sides,
    so step 2 (policy != reference, KL > 0) matches too."""
    from jetmoe_ft.kto import main as kto_main

    common = ["--config", str(ROOT / "recipes" / "tiny" / "kto.yaml"), *COMMON, "--max_train_samples", "32"]
    two = _launch_two_ranks(
        "jetmoe_ft.kto",
        [*common, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2"],
    )
    assert "KTO: reference frozen copy" in two
    kto_main([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"])
    _assert_same_training(tmp_path / "one", tmp_path / "two")
    logs = json.loads((tmp_path / "two" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert logs[1]["kl"] > 0  # the second step's KL term is live, and equal on both sides


def _equal_length_pairs(count: int, offset: int = 0) -> list[dict]:
    """Prompts and answers of the same token count each: ORPO's NLL term is TRL's per-process token mean, equal
    to the global one only when the processes hold as many answer tokens."""
    return [
        {
            "prompt": [{"role": "user", "content": f"Please help me with task {letter}."}],
            "chosen": [{"role": "assistant", "content": f"Yes, task {letter} is done."}],
            "rejected": [{"role": "assistant", "content": f"No, not task {letter}."}],
        }
        for letter in "ABCDEFGHJKLMNPRSTUVWXYZ"[offset : offset + count]
    ]


def test_orpo_on_two_ranks_matches_one_process_on_the_same_global_batch(tmp_path, one_thread):  # noqa: F811
    from jetmoe_ft.assets import load_tokenizer
    from jetmoe_ft.orpo import main as orpo_main

    train, test = _equal_length_pairs(16), _equal_length_pairs(4, 16)
    tokenizer = load_tokenizer()
    lengths = {len(tokenizer.apply_chat_template(row["prompt"] + row["chosen"])) for row in train}
    assert len(lengths) == 1, lengths
    DatasetDict(train=Dataset.from_list(train), test=Dataset.from_list(test)).save_to_disk(tmp_path / "data")
    common = ["--config", str(ROOT / "recipes" / "tiny" / "orpo.yaml"), *COMMON]
    common += ["--dataset_name", str(tmp_path / "data")]
    two = _launch_two_ranks(
        "jetmoe_ft.orpo",
        [*common, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2"],
    )
    assert two.startswith("ORPO: no reference model") or "\nORPO: no reference model" in two
    orpo_main([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"])
    _assert_same_training(tmp_path / "one", tmp_path / "two")


def test_simpo_on_two_ranks_matches_one_process_on_the_same_global_batch(tmp_path, one_thread):  # noqa: F811
    """SimPO's loss is a mean over pairs of per-pair terms: equal on any data."""
    from jetmoe_ft.orpo import main as orpo_main

    common = ["--config", str(ROOT / "recipes" / "tiny" / "simpo.yaml"), *COMMON, "--max_train_samples", "16"]
    _launch_two_ranks(
        "jetmoe_ft.orpo",
        [*common, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2"],
    )
    orpo_main([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"])
    _assert_same_training(tmp_path / "one", tmp_path / "two")
