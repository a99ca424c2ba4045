"""Named contracts between passes: the metadata keys one pass writes and another reads.

Where each lives:
* ``node.meta`` / ``value.meta``: facts about one node or value; copied with the graph, never
  written to ONNX (except ``SOURCE``, which the ONNX back end keeps in ``metadata_props``).
* ``graph.scratch``: pass-to-pass data about the whole graph (pruning plans, removed blocks).
  Copied with the graph and never serialized; ``graph.model_meta`` holds only what came from,
  or goes to, the ONNX ModelProto.
"""

# node.meta
SOURCE = "source"  # str: the ONNX node name or torch module path a node came from
FLOAT_WEIGHT = "float_weight"  # FakeQuant (weight): the weights before GPTQ rounding (bias correction's reference)
CHOSEN_BITS = "chosen_bits"  # Conv/Gemm/MatMul: weight bits choose-bits allocated; quantize uses them
BIAS_BEFORE_CORRECTION = "bias_before_correction"  # Conv/Gemm: its bias before correct-bias (float view, idempotence)
AWQ_SCALE = "awq_scale"  # MatMul/Gemm: the per-input-channel factors awq moved into its weight (idempotence)

# value.meta
BN_STATS = "bn"  # a folded BN's output: {"gamma": [C], "beta": [C]}; the value is ~N(beta, gamma^2)
MASK = "mask"  # a weight constant: graphopt.masks.Mask (element-wise or N:M)

# graph.scratch
CHANNEL_MASKS = "channel_masks"  # prune-channels -> fold-prune: {space key: Mask(kind="channel")}
COLUMN_PLANS = "column_plans"  # column-combine -> systolic back end, analyze, packed file: {weight name: columns.Plan}
SPARSITY_SCHEDULE = "sparsity_schedule"  # prune-gradual -> finetune: the polynomial schedule and its weights
PRUNED_BLOCKS = "pruned_blocks"  # prune-blocks: {"macs0": MACs before any removal, "removed": [Add names]}
