"""OpenAI-style errors: one exception type for the routes, one body shape for every failure.

Every failure leaves the server as `{"error": {"message", "type", "param", "code"}}` with the HTTP status equal
to `code`, as vLLM does; FastAPI's own 422 validation answer is never used (the routes parse bodies themselves and
the exception handlers below turn anything that slips through into this shape).
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("fp4serve.server")


class APIError(Exception):
    """An error with an HTTP status, raised anywhere below a route and rendered by `error_response`."""

    def __init__(self, message: str, status: int = 400, err_type: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type or _default_type(status)
        self.param = param


def _default_type(status: int) -> str:
    return {
        400: "BadRequestError",
        401: "AuthenticationError",
        404: "NotFoundError",
        501: "NotImplementedError",
        503: "ServiceUnavailableError",
    }.get(status, "InternalServerError" if status >= 500 else HTTPStatus(status).phrase)


def error_body(message: str, status: int, err_type: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type or _default_type(status), "param": param, "code": status}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.status, exc.err_type, exc.param), status_code=exc.status)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, "BadRequestError", param)


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """A readable text for a pydantic error, and the dotted location of the first problem (the `param`)."""
    lines = []
    param = None
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err.get("loc", ()) if part != "body")
        if param is None and loc:
            param = loc
        msg = err.get("msg", "invalid value")
        # model validators raise ValueError("...") which pydantic prefixes with "Value error, "
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines) or str(exc), param


def from_validation_error(exc: ValidationError) -> APIError:
    message, param = validation_message(exc)
    return APIError(message, 400, "Bad Request", param)


def install_handlers(app: FastAPI) -> None:
    """Route every exception the framework could produce into the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(APIError(str(exc.errors()), 400, "Bad Request"))

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return error_response(from_validation_error(exc))

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(APIError(f"Invalid JSON body: {exc}", 400, "Bad Request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return JSONResponse(
            error_body(message, exc.status_code, HTTPStatus(exc.status_code).phrase),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(NotImplementedError)
    async def _not_implemented(_: Request, exc: NotImplementedError) -> JSONResponse:
        return error_response(APIError(str(exc) or "Not implemented", 501))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal server error", exc_info=exc)
        return error_response(APIError("Internal server error", 500))
