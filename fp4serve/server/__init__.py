"""The OpenAI-compatible HTTP server (`fp4serve serve`): vLLM's API surface over fp4serve's engine.

Map: `settings` (server knobs) → `launch` (build engine, tokenizer, template; run uvicorn) → `api` (routes, body
parsing, API key) → `chat_serving` / `completion_serving` (one request: validate, render, generate, parse, shape)
over `generation` (engine streams, admission, metrics). `protocol` holds the request models, `responses` the
response and chunk shapes, `errors` the OpenAI error body, `streaming` the SSE plumbing, `chat` prompt rendering,
`media` image/video input, `params` sampling parameters and length rules, `metrics` the Prometheus text.
"""
