"""Front ends: an ONNX file or a torch ``nn.Module`` -> one ``graphopt.ir.Graph``."""
