"""The OpenAI-compatible HTTP API: the same completions, feedback and keys as the gRPC API, on
FastAPI under uvicorn in the serving process's own event loop.

`app` builds the application from the server's parts (`ApiParts`) and holds its routers;
`listener` runs uvicorn as a task of the running loop; `completions` (chat and text
completions, models) and `feedback` are the routes; `schemas` holds the request shapes and
turns them into the gRPC requests the shared code takes; `responses` writes the answers;
`errors` maps the shared errors (serving/errors.py's RpcFailure) to HTTP statuses and
OpenAI's error body, and counts every call in the per-RPC metrics.

Another page (e.g. the labelling page) joins the same port with `app.include_router`.
"""
