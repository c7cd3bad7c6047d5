"""Every error the server answers is JSON, `{"error": "what happened and what to do"}`, with a 4xx
code for anything the client can fix, and 500 (details in the server's log only) for the rest."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ImageError, ImgsimError, IndexCorruptError, IndexNotFoundError, ModelError
from ..output import json_text

log = logging.getLogger("imgsim.server")


class ApiError(Exception):
    """An answer with this status and message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class JsonResponse(JSONResponse):
    """Every JSON answer (the app's default response class): valid UTF-8 whatever file names it holds
    (`output.json_text`: a name that is not UTF-8 is written with \\udcNN escapes), where FastAPI's
    own encoder would fail on such a name and answer 500."""

    def render(self, content) -> bytes:
        return json_text(content, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JsonResponse({"error": message}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = []
        for problem in exc.errors():
            where = ".".join(str(part) for part in problem.get("loc", ()) if part not in ("query", "path", "body"))
            problems.append(f"{where}: {problem.get('msg', 'invalid')}" if where else problem.get("msg", "invalid"))
        return error_response(422, "invalid request: " + "; ".join(problems))

    @app.exception_handler(ImageError)
    async def image_error(request: Request, exc: ImageError):
        return error_response(422, str(exc))

    @app.exception_handler(ImgsimError)
    async def imgsim_error(request: Request, exc: ImgsimError):
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        server_side = isinstance(exc, (IndexCorruptError, IndexNotFoundError, ModelError))
        return error_response(503 if server_side else 400, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal error: see the server's log")
