"""Benchmark implementations, shared by `sparsefast bench ...` (sparsefast/cli/bench.py) and the scripts under the
repository's bench/ folder (micro/: pytest-benchmark files, e2e/: end-to-end scripts, gpu/run.sh: the one budgeted
GPU call), which stay thin and import from here.

    results         where a result goes (`bench/results/YYYY-MM-DD-<device>-<what>.json`) and the run metadata
                    every result carries (git commit, CPU/GPU, versions, load average)
    timing          median timings (triton.testing.do_bench on CUDA, optionally a CUDA-graph replay)
    memory          bytes and bandwidth: tensor bytes, measured copy/read bandwidth (the roofline), peak RSS
    shapes          the reference models' linear shapes (LLaMA-7B/13B/70B, Llama-3-8B, SmolLM2-135M)
    prune_speed     `sparsefast bench prune`: every pruning method on the same weights and calibration ids
    serving         the serving benchmark's HTTP client, server processes and vLLM's metrics
    serving_report  `sparsefast bench serve`: servers side by side, ratios against a baseline, the plot
    decode          decode-speed measurements of the generation engine, `model.generate` and transformers'
                    continuous batching (gpt-fast's units)

Importing this package imports nothing heavy; each module imports torch where it needs it. The bench/ folder
itself is not a package: `bench` is the name of an unrelated PyPI project.
"""
