"""Embedded TF Serving-compatible gRPC server for the melanoma pipeline.

`start_server` is imported lazily so that config parsing (`melanoma_tf.serving.config`)
does not pay for a TensorFlow import.
"""

from typing import Any

__all__ = ["start_server", "ServerHandle"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from melanoma_tf.serving import server

        return getattr(server, name)
    raise AttributeError(name)
