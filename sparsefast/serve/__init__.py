"""Serving pruned models: the batching generation engine (engine.py: scheduler; kv_cache.py, runner.py,
sampling.py, detokenize.py) and the OpenAI-compatible HTTP app. Import the submodules directly; this package
imports nothing so that `import sparsefast` stays light."""
