"""The API's documentation pages and the error answers every operation documents.

Swagger UI (``/docs``) and ReDoc (``/redoc``) load their scripts, style sheet and icon from this service, under
``/docs/assets``: the files ship in the ``fastapi-offline`` package, so the pages work on a network that reaches
nothing else. Swagger UI's online validator badge, its one other outside request, is off.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
ASSETS_PATH = "/docs/assets"
"""Where the pages' assets are served: Swagger UI's script and style sheet, ReDoc's script, the icon."""


class ErrorBody(BaseModel):
    """A refused request: why, in a sentence (the body of every error answer but 413 and request validation)."""

    detail: str = Field(description="Why the request was refused", examples=["no such call"])


class ValidationIssue(BaseModel):
    """One thing wrong with a request."""

    loc: list[str | int] = Field(
        description="Where: the part of the request (body, query, path, header), then the field names and list "
        "positions down to the value",
        examples=[["body", "to"]],
    )
    msg: str = Field(description="What is wrong, in words", examples=["String should match pattern"])
    type: str = Field(description="The kind of problem, a stable code", examples=["string_pattern_mismatch"])


class ValidationErrorBody(BaseModel):
    """A request that cannot be carried out as asked (the body of a 422 answer)."""

    detail: list[ValidationIssue] | str = Field(
        description="What is wrong with the request, one issue each, when it does not match its schema; a sentence "
        "when it does but cannot be carried out (an unknown agent, a cursor this service did not make, Twilio's "
        "refusal)"
    )


_ANSWERS: dict[int, dict[str, Any]] = {
    401: {
        "model": ErrorBody,
        "description": "No bearer token, or not CALLBRIDGE_API_TOKEN (with no token configured, every request)",
        "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    },
    404: {"model": ErrorBody, "description": "No such call on record (or at Twilio)"},
    409: {"model": ErrorBody, "description": "The request conflicts with the call's state"},
    413: {
        "description": "The request's body is larger than CALLBRIDGE_MAX_REQUEST_BYTES",
        "content": {
            "text/plain": {
                "schema": {
                    "type": "string",
                    "description": "The limit, in words",
                    "examples": ["request body larger than 1048576 bytes"],
                }
            }
        },
    },
    422: {"model": ValidationErrorBody, "description": "The request cannot be carried out as asked"},
    502: {"model": ErrorBody, "description": "Twilio failed or could not be reached"},
    503: {"model": ErrorBody, "description": "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN are not configured"},
}


def answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The documentation of these error answers, for a route's or a router's ``responses``."""
    return {status: _ANSWERS[status] for status in statuses}


def serve_docs(app: FastAPI) -> None:
    """Swagger UI at ``/docs`` and ReDoc at ``/redoc``, on assets served by ``app`` itself.

    ``app`` is made with ``docs_url=None, redoc_url=None`` (FastAPI's own pages load their assets from a CDN).
    """
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or f"{DOCS_PATH}/oauth2-redirect"
    app.mount(ASSETS_PATH, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            oauth2_redirect_url=f"{root}{oauth2_redirect_url}",
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})},
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )
