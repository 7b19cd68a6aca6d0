"""RL under FSDP2: two processes (torchrun, gloo) split the prompts, sample with full copies of
the sharded policy refreshed in memory after every update, and take the same steps as one
process with all the prompts.

    PYTHONPATH=src python -m pytest tests/test_rl_distributed.py -q
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_model, tok, tok_dir  # noqa: F401  (fixtures)

from megrez.loading import save_model

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)

SCRIPT = """
import json, sys
from pathlib import Path
from test_rl import EvenLength
from megrez.train.rl import RLConfig, RLTrainer
from megrez.train import distributed
cfg = RLConfig(**json.loads(sys.argv[1]))
res = RLTrainer(cfg, task=EvenLength()).run()
# one file per rank: two ranks printing to one pipe can interleave their lines
Path(cfg.out, f"result-rank{distributed.rank()}.json").write_text(
    json.dumps({"rank": distributed.rank(), "rewards": res["rewards"], "losses": res["losses"]}))
distributed.cleanup()
"""


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_rl_matches_one_process(tmp_path, tok, tok_dir):  # noqa: F811
    policy = save_model(tiny_model(tok, seed=3), tmp_path / "policy", dtype=torch.float32, copy_from=tok_dir)
    common = dict(init=str(policy), steps=3, prompts_per_step=4, group_size=4, filter_samples=0, minibatches=1,
                  ppo_epochs=1, micro_batch_size=8, lr=1e-3, eval_every=100, save_every=3, max_num_seqs=8,
                  progress=False, plots=False, eval_task_options=None, device="cpu")
    script = tmp_path / "run_rl.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    outs = {}
    for name, nproc in (("dist", 2), ("single", 1)):
        cfg = json.dumps({**common, "out": str(tmp_path / name)})
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(nproc), str(script), cfg], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = [json.loads(f.read_text()) for f in sorted((tmp_path / name).glob("result-rank*.json"))]
    dist, (single,) = outs["dist"], outs["single"]
    assert sorted(r["rank"] for r in dist) == [0, 1] and dist[0]["rewards"] == dist[1]["rewards"]
    # Same rollouts (seeds per prompt and sample; weights synced after every update) ...
    assert dist[0]["rewards"] == single["rewards"]
    # The first step's loss is computed from the same weights: equal up to the summation order.
    # Later ones come from weights the Adam rounding below has moved a little (a clipped loss
    # of a group-normalised advantage is near zero, so no relative bound suits it): within a
    # thousandth of the losses' scale.
    scale = max(abs(x) for x in single["losses"])
    assert dist[0]["losses"][0] == pytest.approx(single["losses"][0], rel=1e-4, abs=1e-6 * scale)
    assert dist[0]["losses"] == pytest.approx(single["losses"], rel=1e-3, abs=1e-3 * scale)
    assert any(x != 0 for x in single["losses"])
    # ... so the same updates, up to the order of the gradient reduction. Adam divides by the
    # gradients' running RMS, so where a gradient is nearly zero that rounding moves the update
    # by a fraction of the learning rate: allow 2% of the most a weight can move (steps x lr).
    a, b = (load_file(str(tmp_path / n / "final" / "model.safetensors")) for n in ("dist", "single"))
    moved = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0.02 * common["steps"] * common["lr"], rtol=0, msg=k)
        moved = max(moved, float((b[k] - load_file(str(policy / "model.safetensors"))[k]).abs().max()))
    assert moved > 0.5 * common["lr"]  # the policy did change
