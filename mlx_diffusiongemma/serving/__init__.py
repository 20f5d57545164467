"""The OpenAI-compatible server's parts: `requests` (what a body means, or a 400 naming the
field), `output` (decoded text to content, reasoning and tool calls), `prompt_store` (the prompt
cache across requests), `scheduler` (continuous batching at canvas granularity), `http`
(uvicorn's protocol with header timeouts and JSON framing errors) and `app` (the routes)."""
