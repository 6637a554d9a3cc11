"""`python -m zoomer_jax serve`: the zoom agent behind an OpenAI-compatible chat-completions API (docs/serve.md).

`api.py` the wire format, `batcher.py` the queue and scheduler thread, `runner.py` a batch through the model,
`server.py` the HTTP server and the command.
"""
