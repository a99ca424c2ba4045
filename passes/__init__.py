"""The graphopt pass library. Importing it registers every pass and preset."""

from graphopt.pipeline import register_preset

from . import canonicalize, depth, dfq, prune, quantize, train  # noqa: F401

register_preset("default", "canonicalize", "what `graphopt convert` runs when no pipeline is given")
register_preset("clean", "canonicalize,simplify,canonicalize",
                "canonicalize, then onnxsim for shape plumbing, then canonicalize again")
register_preset("int8", "canonicalize,fold-bn,quantize{weights=int8:channel,acts=uint8:tensor}",
                "INT8 PTQ: per-channel 8-bit weights, per-tensor 8-bit activations (needs --calib)")
register_preset("dfq", "canonicalize,fold-bn,equalize,absorb-bias,quantize{weights=int8:tensor,acts=uint8:tensor,"
                "weight_method=mse},correct-bias", "data-free quantization recipe: per-tensor W8A8 (MSE weight "
                "clipping) after equalization and bias absorption, then bias correction (needs --calib)")
register_preset("w4a8", "canonicalize,fold-bn,equalize,absorb-bias,quantize{weights=int4:channel,acts=uint8:tensor,"
                "weight_method=gptq,first_last_bits=8},correct-bias",
                "per-channel 4-bit weights (GPTQ rounding; first and last layers 8-bit), 8-bit activations, "
                "with equalization and bias correction (needs --calib)")
