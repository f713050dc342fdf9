"""The HTTP application: FastAPI, its routers, and OpenAI's error body for what FastAPI refuses
itself. No OpenAPI schema or docs pages: the API is OpenAI's, documented in docs/OPENAI-API.md,
and a served schema would be one more unauthenticated route."""

from __future__ import annotations

from fastapi import FastAPI

from instructloop.serving.openai import completions, feedback
from instructloop.serving.openai.errors import install_handlers
from instructloop.serving.openai.parts import ApiParts


def build_app(parts: ApiParts) -> FastAPI:
    """The app with every route of the OpenAI-compatible API; more routers (e.g. a labelling
    page) join with `app.include_router`."""
    app = FastAPI(title="instructloop", docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    app.include_router(completions.router(parts))
    app.include_router(feedback.router(parts))
    app.state.parts = parts
    return app
