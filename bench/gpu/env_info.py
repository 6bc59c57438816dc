"""The environment of a GPU run as one JSON object on stdout: GPU name, driver, memory, torch / triton / CUDA
versions and the git commit (bench/gpu/run.sh stage 1). Without CUDA (the dry run) the GPU fields are null."""

from __future__ import annotations

import json
import subprocess
import sys

from sparsefast.bench.results import run_metadata


def nvidia_smi() -> dict | None:
    fields = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return dict(zip(fields.split(","), (v.strip() for v in out.stdout.splitlines()[0].split(","))))


def main() -> int:
    import torch

    info = {**run_metadata(), "nvidia_smi": nvidia_smi(), "cuda_available": torch.cuda.is_available(),
            "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
            "weights": "random (timings do not depend on the values)"}
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
