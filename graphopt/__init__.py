"""graphopt: a compiler for neural networks (ONNX / PyTorch -> one IR -> passes -> ONNX)."""

__version__ = "0.1.0"

from graphopt.errors import FrontendError, GraphError, GraphOptError, PassError, PipelineError, UnsupportedOpError  # noqa: F401
from graphopt.frontends.onnx_file import load_onnx  # noqa: F401
from graphopt.ir import Graph, Node, Value  # noqa: F401
from graphopt.serialize import save_onnx, to_onnx  # noqa: F401


def convert(model, output=None, **kw):
    """Model -> compressed file, returning a ``Report`` (see ``graphopt.api.convert``)."""
    from graphopt.api import convert as _c

    return _c(model, output, **kw)


def from_torch(module, example_inputs, **kw):
    """torch ``nn.Module`` -> ``Graph`` (see ``graphopt.frontends.torch_fx.from_torch``)."""
    from graphopt.frontends.torch_fx import from_torch as _f

    return _f(module, example_inputs, **kw)


def to_torch(graph, outputs=None, train_bn=False, folded_bn="frozen"):
    """``Graph`` -> ``nn.Module`` that runs it (see ``graphopt.backends.torch_module.to_torch``)."""
    from graphopt.backends.torch_module import to_torch as _t

    return _t(graph, outputs, train_bn=train_bn, folded_bn=folded_bn)
