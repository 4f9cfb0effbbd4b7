"""melanoma_tf: melanoma detection in dermoscopy images with TF Model Garden and Keras."""

__version__ = "0.1.0"

import os as _os

# TensorFlow's INFO lines (oneDNN, CUDA stubs) drown our progress output; users can override.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
