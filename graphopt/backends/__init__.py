"""Back ends: ``Graph`` -> float ONNX (``onnx_file``), integer ONNX (``lowering``: Q/DQ and
QOperator) and a trainable torch ``nn.Module`` (``torch_module``)."""
