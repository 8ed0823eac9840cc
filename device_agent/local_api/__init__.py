"""The device's local inference API (OpenAI-compatible /v1, KServe v2 /v2), run by the agent.

server.py         LocalApi (uvicorn in the agent's loop), the API key check, the app
openai_routes.py  /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings,
                  /v1/push/{model}
kserve_routes.py  /v2/health/live|ready, /v2/models/{name}[/ready|/infer]
common.py         the route context, errors in OpenAI and KServe shapes, body limits, results
"""

from __future__ import annotations

from device_agent.local_api.server import LocalApi, LocalApiError, build_app

__all__ = ["LocalApi", "LocalApiError", "build_app"]
