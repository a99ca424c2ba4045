"""graphopt: a compiler for neural networks (ONNX / PyTorch -> one IR -> passes -> ONNX)."""

__version__ = "0.1.0"

from .errors import FrontendError, GraphError, GraphOptError, PassError, PipelineError, UnsupportedOpError  # noqa: F401
from .ir import Graph, Node, Value  # noqa: F401
from .onnx_backend import save_onnx, to_onnx  # noqa: F401
from .onnx_frontend import load_onnx  # noqa: F401
