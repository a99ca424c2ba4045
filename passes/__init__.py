"""The graphopt pass library. Importing it registers every pass and preset."""

from graphopt.pipeline import register_preset

from . import bits, canonicalize, columns, depth, dfq, prune, quantize, smooth, sparsity, train  # noqa: F401

register_preset("default", "canonicalize", "what `graphopt convert` runs when no pipeline is given")
register_preset("clean", "canonicalize,simplify,canonicalize",
                "canonicalize, then onnxsim for shape plumbing, then canonicalize again")
register_preset("int8", "canonicalize,fold-bn,quantize{weights=int8:channel,acts=uint8:tensor}",
                "INT8 PTQ: per-channel 8-bit weights, per-tensor 8-bit activations (needs --calib)")
register_preset("int8-dynamic", "canonicalize,quantize{weights=int8:channel,acts=dynamic,embeddings=true}",
                "INT8 weights per channel, Gemm/MatMul inputs quantized at run time (DynamicQuantizeLinear + "
                "MatMulInteger, as onnxruntime's quantize_dynamic) and int8 embedding tables; for transformers; no --calib "
                "needed")
register_preset("dfq", "canonicalize,fold-bn,equalize,absorb-bias,quantize{weights=int8:tensor,acts=uint8:tensor,"
                "weight_method=mse},correct-bias", "data-free quantization recipe: per-tensor W8A8 (MSE weight "
                "clipping) after equalization and bias absorption, then bias correction (needs --calib)")
register_preset("w4a8", "canonicalize,fold-bn,quantize{weights=int4:channel,acts=uint8:tensor,weight_method=gptq,"
                "first_last_bits=8},correct-bias",
                "per-channel 4-bit weights (GPTQ rounding; first and last layers 8-bit), 8-bit activations, bias "
                "correction; no equalization, so every layer fuses as in int8 (needs --calib)")
register_preset("w4a8-small", "canonicalize,fold-bn,equalize,absorb-bias,quantize{weights=int4:channel,"
                "acts=uint8:tensor,weight_method=gptq,first_bits=8},correct-bias",
                "w4a8 with the classifier 4-bit too (only the first layer 8-bit) and equalization: the smallest "
                "4-bit file (needs --calib)")
register_preset("w4a8-pwlq", "canonicalize,fold-bn,equalize,absorb-bias,quantize{weights=pwlq4:channel,"
                "acts=uint8:tensor,weight_method=gptq,first_last_bits=8},correct-bias",
                "piecewise-linear 4-bit weights (+1 region bit: 5 bits stored) with GPTQ rounding, equalization "
                "and bias correction (the PWLQ variant the calibration images choose); its layers run in float "
                "(needs --calib)")
register_preset("w3a8", "canonicalize,fold-bn,equalize,absorb-bias,quantize{weights=apot3:channel,"
                "acts=uint8:tensor,weight_method=gptq,first_last_bits=8},correct-bias",
                "3-bit APoT weights (GPTQ rounding onto its grid; first and last layers 8-bit), 8-bit activations, "
                "equalization and bias correction (needs --calib)")
register_preset("kmeans4", "canonicalize,fold-bn,quantize{weights=kmeans4,acts=float},correct-bias",
                "post-training k-means weight sharing (Deep Compression): 16 shared float values per layer, "
                "activations float, bias correction (from BatchNorm statistics, or --calib); write with --format qdq "
                "for the palettized file, then `graphopt compress` for the Huffman-coded .gdc")
register_preset("int8-static-tf", "canonicalize,smooth{alpha=auto},quantize{weights=int8:channel,acts=uint8:tensor,"
                "act_outputs=false,embeddings=true}",
                "static INT8 for transformers: SmoothQuant (alpha per input, chosen on the calibration data), "
                "per-channel int8 weights and embedding tables, per-tensor uint8 inputs of every MatMul/Gemm; layer "
                "outputs, residual adds, LayerNorm and Softmax stay float (needs --calib)")
