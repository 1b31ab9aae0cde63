"""The main job, end to end: examples/train_tiny.py --quick on CPU."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "examples" / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_run_improves_the_ground_truth_reward(tmp_path, capsys):
    out = tmp_path / "run"
    summary = load_example().main(["--quick", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "held-out prompts: before (SFT = pi_ref) vs after (DPO)" in printed
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["dpo"]["reward_mean"] == summary["dpo"]["reward_mean"]
    for name in ["tokenizer.json", "training_curves.png", "reward_vs_kl.png", "pairs_train.jsonl", "pairs_eval.jsonl",
                 "sft/checkpoint/model.safetensors", "sft/metrics.jsonl", "dpo_beta0.1/checkpoint/model.safetensors",
                 "dpo_beta0.1/metrics.jsonl"]:
        assert (out / name).exists(), name
    sft, dpo = summary["sft"], summary["dpo"]
    # DPO moves the policy toward the preferred (positive) behaviour: the held-out mean
    # ground-truth reward rises by more than three combined standard errors
    gap = dpo["reward_mean"] - sft["reward_mean"]
    assert gap > 3 * (sft["reward_se"] ** 2 + dpo["reward_se"] ** 2) ** 0.5, (sft, dpo)
    # at a finite, positive KL cost, with an implicit reward that ranks held-out pairs
    assert 0 < dpo["kl"] < float("inf")
    assert dpo["accuracy"] > 0.5
    assert len(summary["examples"]) == 3
