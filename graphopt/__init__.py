"""graphopt: a compiler for neural networks (ONNX / PyTorch -> one IR -> passes -> ONNX)."""

__version__ = "0.1.0"

from .errors import FrontendError, GraphError, GraphOptError, PassError, PipelineError, UnsupportedOpError  # noqa: F401
from .ir import Graph, Node, Value  # noqa: F401
from .onnx_backend import save_onnx, to_onnx  # noqa: F401
from .onnx_frontend import load_onnx  # noqa: F401


def from_torch(module, example_inputs, **kw):
    """torch ``nn.Module`` -> ``Graph`` (see ``graphopt.torch_frontend.from_torch``)."""
    from .torch_frontend import from_torch as _f

    return _f(module, example_inputs, **kw)


def to_torch(graph, outputs=None, train_bn=False):
    """``Graph`` -> ``nn.Module`` that runs it (see ``graphopt.torch_backend.to_torch``)."""
    from .torch_backend import to_torch as _t

    return _t(graph, outputs, train_bn=train_bn)
