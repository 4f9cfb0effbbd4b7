"""Errors carrying the gRPC status code TF Serving would answer with."""

from __future__ import annotations

import re

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


# What a TensorFlow error message says about the graph, not about the request: the traceback of
# "Detected at node ... defined at", and the node and op annotations.
_GRAPH_DETAIL = re.compile(r"\s*\[\[\{\{node [^}]*\}\}\]\]|\s*\[Op:[^\]]*\]")


def public_message(message: str) -> str:
    """A TensorFlow error message without the graph's node names, op names and source
    locations, which a client has no use for (TF Serving's answers do not carry them either)."""
    lines = [line for line in message.splitlines()
             if line.strip() and not line.startswith((" ", "Graph execution error", "Detected at node"))]
    return _GRAPH_DETAIL.sub("", " ".join(lines)).strip() or message.splitlines()[0]


def reply_too_large(size: int, limit: int) -> ServingError:
    """A reply over the server's limit, refused before it is built: a retry cannot help, so it
    is the client's error (400), not RESOURCE_EXHAUSTED (429, "retry later")."""
    return invalid_argument(
        f"the reply would take {size / 2**20:.1f} MiB or more, over this server's limit of "
        f"{limit / 2**20:.1f} MiB (--max-message-mb): send fewer instances, or name the outputs you "
        "need (output_filter)")


def from_exception(exc: BaseException) -> ServingError:
    """Map a TensorFlow `OpError` (same numbering as gRPC codes) or anything else."""
    if isinstance(exc, ServingError):
        return exc
    error_code = getattr(exc, "error_code", None)
    message = public_message(getattr(exc, "message", None) or str(exc) or type(exc).__name__)
    if isinstance(error_code, int) and error_code in _CODES_BY_NUMBER and error_code != 0:
        return ServingError(_CODES_BY_NUMBER[error_code], message)
    return ServingError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {message}")


def code_number(code: grpc.StatusCode) -> int:
    """The numeric code as stored in TF Serving's `StatusProto.error_code`."""
    return code.value[0]
