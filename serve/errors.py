"""Every refusal as OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`:
what the `openai` client raises as BadRequestError, AuthenticationError, NotFoundError ... with
the message intact. Bad input is never a 500 and never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dfuse.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """A refusal with its HTTP status; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad_field(message: str) -> APIError:
    """The engine's ValueError ("num_inference_steps: must be in [1, 1000] (got 0)") as a 400 whose
    param is the field it names."""
    field, sep, _ = message.partition(": ")
    param = field.split("[")[0].split(" ")[0] if sep and " " not in field.strip() else None
    return APIError(400, message, param=param, code="invalid_value")


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(_request: Request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, error: StarletteHTTPException):
        message = {404: "no such route", 405: "method not allowed on this route"}.get(error.status_code, str(error.detail))
        return APIError(error.status_code, message, code=str(error.status_code)).response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, error: RequestValidationError):
        first = error.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return APIError(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param=param,
                        code="invalid_value").response()

    @app.exception_handler(Exception)
    async def on_unexpected(_request: Request, error: Exception):
        log.exception("unexpected error while serving a request")
        return APIError(500, f"internal error ({type(error).__name__}); the server keeps serving",
                        code="internal_error").response()
