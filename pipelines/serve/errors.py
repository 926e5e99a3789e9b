"""The endpoint's one error shape, OpenAI's: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi.responses import JSONResponse

# One error shape on every route, OpenAI's: {"error": {"message", "type", "param", "code"}}; code is the
# HTTP status (as vLLM sends it), type the kind of error by status, param the request field at fault.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable_error"}


class ApiError(Exception):
    """An answer other than 200: status, a message naming what is wrong, and the field at fault (or None)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        self.status, self.message, self.param = status, message, param


def error_answer(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    body = {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
            "code": status}
    return JSONResponse({"error": body}, status_code=status, headers=headers)
