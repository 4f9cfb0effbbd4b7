"""Errors carrying the gRPC status code TF Serving would answer with."""

from __future__ import annotations

import grpc

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """A request failure that maps onto one gRPC status (never kills the server)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def invalid_argument(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def failed_precondition(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def from_exception(exc: BaseException) -> ServingError:
    """Map a TensorFlow `OpError` (same numbering as gRPC codes) or anything else."""
    if isinstance(exc, ServingError):
        return exc
    error_code = getattr(exc, "error_code", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if isinstance(error_code, int) and error_code in _CODES_BY_NUMBER and error_code != 0:
        return ServingError(_CODES_BY_NUMBER[error_code], message)
    return ServingError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {message}")


def code_number(code: grpc.StatusCode) -> int:
    """The numeric code as stored in TF Serving's `StatusProto.error_code`."""
    return code.value[0]
