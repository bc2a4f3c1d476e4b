"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the status OpenAI would use; on
Ollama's routes in Ollama's, {"error": message}."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from meadow.client.chat_prompt import ConversationRefused
from meadow.client.routing import MissingBlocksError
from meadow.wire import MeadowError, RemoteError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error to answer with: HTTP status and OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, plain: bool = False) -> JSONResponse:
        """The error as a response; `plain`: in Ollama's shape."""
        return JSONResponse({"error": self.message} if plain else self.body(), status_code=self.status)


def api_error(error: BaseException) -> APIError:
    """What a failure of generation means to the API's user."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, MissingBlocksError):
        return APIError(503, str(error), "server_error", code="missing_blocks")
    if isinstance(error, RemoteError) and error.kind == "BadRequest":  # e.g. longer than a server's --max-length
        return APIError(400, f"the swarm refused the request: {error}", code="refused_by_server")
    if isinstance(error, (MeadowError, TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return APIError(503, f"the swarm could not serve the request: {error}", "server_error", code="swarm_unavailable")
    logger.exception("unexpected error", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}: {error}", "server_error")


def install_error_handlers(app: FastAPI, plain_paths: frozenset[str] = frozenset()) -> None:
    """Every error the app answers with, including FastAPI's own (422 for bad fields becomes OpenAI's 400); on
    `plain_paths`, in Ollama's shape."""

    def respond(request: Request, error: APIError) -> JSONResponse:
        return error.response(plain=request.url.path in plain_paths)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return respond(request, error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return respond(request, APIError(400, "the request body is not valid JSON", code="invalid_json"))
        # the deepest location is the most specific complaint (a union's other members fail at its top)
        param = max((_param(e.get("loc", ())) for e in errors), key=lambda p: p.count(".") if p else -1)
        reasons = dict.fromkeys(str(e.get("msg")).removeprefix("Value error, ") for e in errors if _param(e.get("loc", ())) == param)
        message = " or ".join(reasons)
        message = f"{param}: {message}" if param else message
        return respond(request, APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(ConversationRefused)
    async def _refused(request: Request, error: ConversationRefused) -> JSONResponse:
        param = "input" if request.url.path == "/v1/responses" else "messages"
        return respond(request, APIError(400, str(error), param=param, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return respond(request, APIError(error.status_code, str(error.detail), kind))


def _param(location: tuple) -> str | None:
    """A field's path as OpenAI names it ("messages.0.content"), without pydantic's union member tags ("str",
    "list[TextPart]", "InputMessage": no field's name begins with a capital) and the "body" it starts with."""
    tags = {"str", "int", "float", "bool", "none", "body"}
    named = lambda part: str(part).isidentifier() and str(part) not in tags and not str(part)[0].isupper()
    parts = [str(part) for part in location if isinstance(part, int) or named(part)]
    return ".".join(parts) or None
