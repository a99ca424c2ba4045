"""graphopt: a compiler for neural networks (ONNX / PyTorch -> one IR -> passes -> ONNX)."""

__version__ = "0.1.0"

from graphopt.errors import FrontendError, GraphError, GraphOptError, PassError, PipelineError, UnsupportedOpError  # noqa: F401

# Imported on first use (PEP 562): `import graphopt` and the CLI's cheap answers (--help,
# --version, an input error) do not pay for onnx, numpy or torch.
_LAZY = {"load_onnx": "graphopt.frontends.onnx_file", "Graph": "graphopt.ir", "Node": "graphopt.ir",
         "Value": "graphopt.ir", "save_onnx": "graphopt.serialize", "to_onnx": "graphopt.serialize",
         "Report": "graphopt.api"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'graphopt' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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
