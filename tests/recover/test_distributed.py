"""`sparsefast recover` on two processes (torchrun, gloo on CPU: what `accelerate launch --multi_gpu` runs) takes the
same optimizer steps as one process on the same global batch, and only the main process writes the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.recover.helpers import ALPACA

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--data", str(ALPACA), "--lr", "3e-3", "--lora-dropout", "0", "--warmup-ratio", "0", "--dtype", "fp32",
          "--device", "cpu", "--no-progress", "--cutoff-len", "128"]


def recover(model_dir, out: Path, processes: int, *flags: str) -> dict:
    cli = ["-m", "sparsefast", "recover", str(model_dir), *COMMON, *flags, "--out", str(out), "--json",
           str(out) + ".json"]
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, *cli], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"optimizer_steps"') == 1  # one summary: the main process's
    return json.loads(Path(str(out) + ".json").read_text())["recovery"]


@pytest.mark.parametrize("single, double", [
    (["--batch-size", "2", "--grad-accum", "2", "--epochs", "3"], ["--batch-size", "2", "--grad-accum", "1",
                                                                   "--epochs", "3"]),
    # 8 records in micro-batches of 3, 3, 2: the second process gets one micro-batch and a zero-weight copy
    (["--batch-size", "3", "--grad-accum", "4", "--epochs", "2"], ["--batch-size", "3", "--grad-accum", "2",
                                                                   "--epochs", "2"]),
], ids=["even", "uneven"])
def test_two_processes_take_the_single_process_steps(tmp_path, story_llama_dir, single, double):
    one = recover(story_llama_dir, tmp_path / "one", 1, *single)
    two = recover(story_llama_dir, tmp_path / "two", 2, *double)
    assert one["processes"] == 1 and two["processes"] == 2 and two["distributed"] == "DistributedType.MULTI_CPU"
    assert len(one["losses"]) == len(two["losses"]) >= 2
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-3
    assert one["losses"][-1] < one["losses"][0]  # the check can fail: it trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "one.json", "two", "two.json"]
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
