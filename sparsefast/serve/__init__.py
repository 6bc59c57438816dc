"""Serving pruned models.

The generation engine: engine.py (iteration-level scheduler), kv_cache.py, runner.py, sampling.py, detokenize.py.
The contract between it and the HTTP layer: engine_client.py (`EngineClient`, `TokenStream`, `TokenEvent`).
The OpenAI-compatible HTTP app: app.py (`create_app`: assembly and model loading), routes.py (the endpoints),
streaming.py (non-streamed and server-sent-event answers), state.py (what handlers read), protocol.py (request and
response bodies), errors.py (error bodies, body limit), metrics.py (Prometheus).

Import the submodules directly; this package imports nothing so that `import sparsefast` stays light."""
