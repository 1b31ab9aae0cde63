"""bench/bench_losses.py on a micro shape: every loss of the table timed next to the model step and the
reference forward, the rows written as JSON. No timing is asserted."""

import json

from bench import bench_losses
from minidpo.losses import LOSS_TABLE


def test_every_loss_is_timed_next_to_the_step(tmp_path, capsys):
    out = tmp_path / "losses.json"
    res = bench_losses.main(["--config", "micro", "--reps", "3", "--steps", "2", "--json", str(out)])
    assert [r["loss"] for r in res["rows"]] == list(LOSS_TABLE)
    assert res["step_ms"] > 0 and res["reference_forward_ms"] > 0
    assert 0 < res["reference_free_saving_recomputed"] < 1
    assert {r["loss"] for r in res["rows"] if not r["reference"]} == {"sft", "simpo", "cpo", "alphapo", "orpo"}
    assert json.loads(out.read_text())["rows"] == res["rows"]
    text = capsys.readouterr().out
    assert "| orpo |" in text and "of the model step" in text
