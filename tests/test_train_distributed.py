"""FSDP2 data parallelism on CPU: two processes under torchrun (gloo) take the same steps as one
process with the whole batch.

    PYTHONPATH=src python -m pytest tests/test_train_distributed.py -q
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import timing
import torch
from safetensors.torch import load_file
from test_train import pretrain_cfg, tok_dir  # noqa: F401  (fixture)

from megrez.train.trainer import Trainer

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_fsdp_step_matches_one_process(tmp_path, tok_dir):  # noqa: F811
    common = dict(steps=2, batch_size=1, seq_len=32, eval_every=2, save_every=2, export_dtype="float32",
                  warmup_steps=1, lr=1e-3)
    # Activation checkpointing on in the FSDP run only: it must not change the step either.
    cfg = pretrain_cfg(tmp_path / "dist", tok_dir, activation_checkpointing=True, **common)
    conf = {k: v for k, v in vars(cfg).items() if k != "stage"}
    (tmp_path / "dist.json").write_text(json.dumps(conf, default=list))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = timing.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       "-m", "megrez.cli", "train", "pretrain", "--config", str(tmp_path / "dist.json")],
                      timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1] and all(r["world_size"] == 2 for r in reports)
    assert reports[0]["losses"] == reports[1]["losses"]  # both ranks see the global loss

    # One process, both rows in its batch: the same global batch, so the same step.
    single = Trainer(pretrain_cfg(tmp_path / "single", tok_dir, **{**common, "batch_size": 2})).run()
    assert reports[0]["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert reports[0]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    a = load_file(str(Path(cfg.out) / "final" / "model.safetensors"))
    b = load_file(str(Path(single["final"]) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    # The FSDP run's checkpoint resumes like any other (full state dicts gathered to rank 0).
    state = torch.load(Path(cfg.out) / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and state["loader"] == {"epoch": 0, "row": 4}
