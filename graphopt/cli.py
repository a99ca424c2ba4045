"""The ``graphopt`` command line.

Exit codes: 0 success; 2 usage error; 1 failure with a one-line message on stderr (add
``--debug`` for the traceback). Output files are written atomically.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

from graphopt import __version__
from graphopt.errors import GraphOptError, PipelineError, UsageError
from graphopt.frontends.sniff import model_kind, precheck

log = logging.getLogger("graphopt")

FORMATS = ("float", "qdq", "qoperator")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **k):
        k.setdefault("formatter_class", _HelpFormatter)  # --help shows defaults
        super().__init__(*a, **k)

    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: usage error: {message}\n")


def _common_flags() -> argparse.ArgumentParser:
    """--debug and -v, accepted after the subcommand too (SUPPRESS: they never reset the top level)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on failure")
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="log pass details (-vv for debug)")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphopt", description="graphopt: a compiler for neural networks (ONNX/PyTorch -> passes -> ONNX).")
    p.add_argument("--version", action="version", version=f"graphopt {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on failure")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log pass details (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _common_flags()
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[common, *k.pop("parents", [])], **k)  # type: ignore[method-assign]

    c = sub.add_parser("convert", help="run a pass pipeline on a model and write ONNX")
    c.add_argument("input", help="model: FILE.onnx, a TorchScript FILE.pt, or MODULE:CALLABLE / FILE.py:CALLABLE")
    c.add_argument("-o", "--output", required=True, help="ONNX file to write (atomically)")
    c.add_argument("--overwrite", action="store_true", help="allow -o to be the input model (replace it in place)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--pipeline", help='pass pipeline, e.g. "canonicalize,fold-constants{max_elements=1000}"')
    g.add_argument("--preset", help="named pipeline (see `graphopt passes`); default: 'default'")
    _torch_args(c)
    c.add_argument("--calib", metavar="FILE.npy|DIR",
                   help="calibration inputs: a float32 .npy array [N, ...] matching the model input, or an image folder")
    c.add_argument("--calib-limit", type=_positive_int, metavar="N", help="use the first N calibration samples")
    c.add_argument("--resize", type=_positive_int, default=256, help="image folder: resize the short side to this")
    c.add_argument("--crop", type=_positive_int, default=224, help="image folder: center crop size")
    c.add_argument("--mean", default="0.485,0.456,0.406", help="image folder: per-channel mean after scaling to "
                   "[0,1] (ImageNet's; the shared EfficientNet-Lite0 needs 0.5,0.5,0.5)")
    c.add_argument("--std", default="0.229,0.224,0.225", help="image folder: per-channel std (ImageNet's; "
                   "EfficientNet-Lite0 needs 0.5,0.5,0.5)")
    c.add_argument("--train", metavar="X.npy", help="training inputs [N, ...] for training steps in the pipeline "
                                                   "(finetune)")
    c.add_argument("--train-labels", metavar="Y.npy", help="integer labels [N] for --train")
    c.add_argument("--teacher", metavar="MODEL", help="teacher for distillation in training steps")
    c.add_argument("--format", choices=FORMATS, default="float", help="output format")
    c.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=0, metavar="{0..4}",
                   help="qoperator: accuracy_level of every MatMulNBits (0: float activations, what the file "
                        "computes; 4: onnxruntime quantizes them to int8 per block, faster, not exact)")
    c.add_argument("--no-report", action="store_true",
                   help="skip the quantization report (onnxruntime's kernel check and per-layer SQNR)")
    c.add_argument("--report-samples", type=_positive_int, default=32, metavar="N",
                   help="calibration samples the per-layer SQNR report uses")
    c.add_argument("--report-json", metavar="FILE",
                   help="also write the report as JSON (schema graphopt.report/1, docs/api.md)")
    c.add_argument("--device", default=None, help="where calibration and training steps run: auto, cpu, cuda, "
                   "cuda:N, mps (default: calibration on the CPU, training steps auto)")
    c.add_argument("--verify-each", action="store_true", help="verify the IR after every pass")
    c.add_argument("--timing", action="store_true", help="print time per pass")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR text after each pass into DIR")
    c.add_argument("--external-data", action="store_true", help="write weights to OUTPUT.data (automatic above 2 GB)")

    sub.add_parser("passes", help="list passes with their options, and presets")

    i = sub.add_parser("inspect", help="per-layer op, shapes, parameters and MACs")
    i.add_argument("model", help="FILE.onnx, TorchScript FILE.pt, or MODULE:CALLABLE")
    _torch_args(i)
    i.add_argument("--ranges", action="store_true",
                   help="per-layer weight-range spread: p99/p1 of per-channel max|w| (why a model quantizes badly)")
    i.add_argument("--plot", metavar="LAYER", help="with --ranges: plot per-channel weight ranges of LAYER (name or "
                                                     "source) to --plot-out, like DFQ's Figure 2")
    i.add_argument("--plot-out", metavar="FILE.png", default="ranges.png", help="PNG for --plot")
    i.add_argument("--sparsity", action="store_true", help="per layer: sparsity, nonzero parameters and MACs, and "
                   "the size of compressed encodings (relative indices; 2-bit indices for 2:4)")

    i.add_argument("--compression", action="store_true", help="Deep Compression's per-layer size table: weights "
                   "kept, bits per weight and per relative index, fixed width and Huffman-coded, and the ratio")

    cp = sub.add_parser("compress", help="Deep Compression file (.gdc): pruned and k-means-shared weights as "
                                         "Huffman-coded indices and relative positions; prints the size table")
    cp.add_argument("model", help="FILE.onnx (a palettized or pruned model, e.g. from quantize{weights=kmeans4,"
                                  "acts=float})")
    cp.add_argument("-o", "--output", required=True, help="the .gdc file to write")
    cp.add_argument("--no-huffman", action="store_true", help="fixed-width streams only (the paper's P+Q)")
    cp.add_argument("--gap-bits", type=int, choices=(0, 2, 3, 4, 5, 6, 7, 8), default=None,
                    help="relative position width for every layer (default: each layer's smallest; 0 = dense)")
    dp = sub.add_parser("decompress", help="rebuild the ONNX model a .gdc file holds (bit for bit)")
    dp.add_argument("input", help="FILE.gdc")
    dp.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    dp.add_argument("--dense", action="store_true", help="expand palettized weights into float initializers")

    a = sub.add_parser("analyze", help="analyses: sensitivity of each prunable channel group, or of each residual block")
    asub = a.add_subparsers(dest="analysis", metavar="ANALYSIS", parser_class=_Parser, required=True)
    _aadd = asub.add_parser
    asub.add_parser = lambda *a_, **k: _aadd(*a_, parents=[common, *k.pop("parents", [])], **k)  # type: ignore[method-assign]
    sens = asub.add_parser("sensitivity", help="prune each group alone at several ratios; table (+ PNG plot)")
    _analysis_args(sens)
    sens.add_argument("--ratios", default="0.1,0.3,0.5,0.7", help="comma-separated ratios")
    sens.add_argument("--criterion", default="l1", choices=("l1", "l2", "bn_scale", "taylor", "random"),
                      help="channel importance, as prune-channels' criterion option")
    sens.add_argument("--round-to", type=_positive_int, default=1,
                      help="keep channel counts multiples of this, as prune-channels' round_to")
    sens.add_argument("--plot", metavar="FILE.png", help="write the curves as a PNG (needs matplotlib)")
    blk = asub.add_parser("blocks", help="remove each residual block alone; table of the damage (what prune-blocks "
                                         "weighs)")
    _analysis_args(blk)
    bits = asub.add_parser("bits", help="quantize each layer alone at several weight widths; sensitivity table, the "
                                        "allocation under --budget and a Pareto PNG (what choose-bits weighs)")
    _analysis_args(bits)
    bits.add_argument("--prepare", default="canonicalize,fold-bn", metavar="PIPELINE",
                      help="passes to run first (the part of the real pipeline before choose-bits)")
    bits.add_argument("--scheme", default="int8:channel", help="the weight scheme (its bit width is varied)")
    bits.add_argument("--widths", default="2,3,4,6,8", help="comma-separated candidate weight widths")
    bits.add_argument("--budget", help="also allocate: size:RATIO, avg:BITS, bops:wXaY or bops:RATIO")
    bits.add_argument("--act-bits", type=_positive_int, default=8, help="activation bits (for a BOPs budget)")
    bits.add_argument("--method", default="sweep", choices=("sweep", "hessian"),
                      help="sweep: output error with one layer quantized; hessian: HAWQ-V2 trace proxy")
    bits.add_argument("--plot", metavar="FILE.png", help="write the predicted error/size Pareto front as a PNG")

    sp = asub.add_parser("sparsity", help="prune each layer's weights alone by magnitude at several sparsities; "
                                          "table, the per-layer choice for --sparsity, and a PNG (what "
                                          "prune-weights{scope=sensitivity} weighs)")
    _analysis_args(sp)
    sp.add_argument("--prepare", default="canonicalize,fold-bn", metavar="PIPELINE",
                    help="passes to run first (the part of the real pipeline before the pruning)")
    sp.add_argument("--levels", default="0.3,0.5,0.7,0.8,0.9,0.95", help="comma-separated per-layer sparsities")
    sp.add_argument("--sparsity", type=float, help="also choose per-layer sparsities for this overall sparsity")
    sp.add_argument("--target", choices=("params", "macs"), default="params",
                    help="--sparsity counts nonzero parameters or nonzero MACs")
    sp.add_argument("--skip", default="", help="comma-separated layer patterns to leave dense")
    sp.add_argument("--plot", metavar="FILE.png", help="write each layer's error against its sparsity as a PNG")

    col = asub.add_parser("columns", help="column combining for systolic arrays: each layer's filter matrix packed; "
                                          "tiles, utilization and cycles dense / sparse / packed; the packed file "
                                          "and a PNG of one layer (no data needed)")
    col.add_argument("model", help="FILE.onnx, TorchScript FILE.pt, or MODULE:CALLABLE")
    _torch_args(col)
    col.add_argument("--array", type=_positive_int, default=64, help="the array size N (N x N); the report also "
                     "gives 32, 64 and 128")
    col.add_argument("--alpha", type=int, default=8, help="most columns per group")
    col.add_argument("--gamma", type=float, default=0.5, help="conflicts a group may prune per row")
    col.add_argument("--window", type=int, default=256, help="columns grouped together")
    col.add_argument("--plans", metavar="FILE.npz", help="take the groups from this packed file (it must match the "
                     "model) instead of grouping")
    col.add_argument("-o", "--output", metavar="FILE.npz", help="write the packed file")
    col.add_argument("--onnx-out", metavar="FILE.onnx", help="write the combined model (its weights are what the "
                     "packed file stands for)")
    col.add_argument("--plot", metavar="FILE.png", help="one layer's filter matrix before and after packing")
    col.add_argument("--layer", help="--plot: the layer (name or source; default: the one that packs most)")

    f = sub.add_parser("finetune", help="recovery fine-tuning (distillation from a teacher and/or labels)")
    f.add_argument("model", help="student model: FILE.onnx, TorchScript FILE.pt, or MODULE:CALLABLE")
    _torch_args(f)
    f.add_argument("-o", "--output", required=True, help="ONNX file to write with the trained weights")
    f.add_argument("--overwrite", action="store_true", help="allow -o to be the student model (replace it in place)")
    f.add_argument("--data", required=True, metavar="X.npy", help="float32 training inputs [N, ...]")
    f.add_argument("--labels", metavar="Y.npy", help="integer labels [N] (adds cross-entropy)")
    f.add_argument("--teacher", metavar="FILE.onnx", help="teacher for knowledge distillation (e.g. the unpruned model)")
    f.add_argument("--epochs", type=_positive_int, default=1)
    f.add_argument("--batch-size", type=_positive_int, default=64)
    f.add_argument("--lr", type=float, default=0.01)
    _schedule_args(f)
    f.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    f.add_argument("--temperature", type=float, default=4.0)
    f.add_argument("--kd-weight", type=float, default=0.7, help="with labels: weight of the distillation loss")
    f.add_argument("--checkpoint", metavar="FILE.pt", help="written after every epoch and on Ctrl-C")
    f.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    f.add_argument("--max-steps", type=_positive_int, help="stop after this many steps")
    f.add_argument("--weight-decay", type=float, default=0.0)
    f.add_argument("--quant-weight-decay", type=float, metavar="WD", help="weight decay on learned quantizer "
                   "parameters (LSQ steps, PACT clips) instead of --weight-decay")
    f.add_argument("--freeze-bn", action="store_true",
                   help="keep BatchNormalization statistics fixed")
    _device_args(f)

    lt = sub.add_parser("lottery", help="lottery tickets: iterative magnitude pruning with rewinding, against its "
                        "controls; table (+ PNG)")
    lt.add_argument("model", help="the network at its initialization (its weights are what round 1 trains and what "
                    "--rewind 0 rewinds to): FILE.onnx, TorchScript FILE.pt, or MODULE:CALLABLE")
    _torch_args(lt)
    lt.add_argument("--data", required=True, metavar="X.npy", help="float32 training inputs [N, ...]")
    lt.add_argument("--labels", required=True, metavar="Y.npy", help="integer training labels [N]")
    lt.add_argument("--val-data", metavar="X.npy", help="held-out inputs to score each round on")
    lt.add_argument("--val-labels", metavar="Y.npy", help="their labels (top-1 per round; without them the table "
                    "shows the training loss)")
    lt.add_argument("--controls", default="ticket", help="comma-separated: ticket, reinit (each round the ticket's mask "
                    "of that round, fresh weights), random_mask (each round a random mask with the ticket's per-layer "
                    "counts, the ticket's initial weights); the controls follow the ticket's state in --state, so the "
                    "ticket runs first; default %(default)s")
    lt.add_argument("--rounds", type=_positive_int, default=5, help="train/prune rounds (default %(default)s)")
    lt.add_argument("--rate", type=float, default=0.2, help="share of surviving weights pruned per round, by one "
                    "global magnitude threshold (default %(default)s)")
    lt.add_argument("--rewind", type=int, default=0, metavar="K", help="rewind survivors to training step K (0: the "
                    "initialization, as Frankle & Carbin; K > 0: late rewinding)")
    lt.add_argument("--epochs", type=_positive_int, default=1, help="epochs per round")
    lt.add_argument("--batch-size", type=_positive_int, default=64)
    lt.add_argument("--lr", type=float, default=2e-4)
    _schedule_args(lt)
    lt.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    lt.add_argument("--weight-decay", type=float, default=0.0)
    lt.add_argument("--state", required=True, metavar="DIR", help="one state per control is saved here after every "
                    "round; the same command continues an interrupted run")
    lt.add_argument("-o", "--output", metavar="FILE.onnx", help="write the first control's last trained, pruned "
                    "network")
    lt.add_argument("--plot", metavar="FILE.png", help="write score against weights remaining, one curve per control")
    _device_args(lt)

    d = sub.add_parser("demo", help="run the main job on a built-in network (no files needed)")
    d.add_argument("-o", "--output", default="graphopt-demo.onnx", help="ONNX file to write (default: %(default)s)")
    d.add_argument("--pipeline", default=None, help="pipeline to run")
    return p


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is a usage error, exit code 2)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _schedule_args(p) -> None:
    p.add_argument("--lr-schedule", choices=("cosine", "linear", "step", "constant"), default="cosine",
                   help="learning rate after the warm-up: cosine or linear to 0, step (x0.1 at 1/2 and 3/4 of the "
                   "steps) or constant (default %(default)s)")
    p.add_argument("--warmup", type=_share, default=0.0, metavar="SHARE",
                   help="share of the steps over which the learning rate first ramps up linearly (default 0)")


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1), got '{text}'")
    return v


def _device_args(p) -> None:
    p.add_argument("--device", default="auto", help="where it trains: auto (CUDA when available, else CPU), cpu, "
                   "cuda, cuda:N, mps")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="autocast the forward pass (quantizer maths stays float32); fp16 needs a GPU")


def _torch_args(p) -> None:
    p.add_argument("--input-shape", metavar="N,C,H,W[:DTYPE]", action="append",
                   help="example input shape (PyTorch models only); repeat it once per input of forward, in "
                   "order; DTYPE float32 (default), int64, int32 or bool (integer inputs are filled with ones)")
    p.add_argument("--weights", metavar="FILE", help="state dict for MODULE:CALLABLE, loaded with weights_only=True")
    p.add_argument("--exporter", choices=("auto", "fx", "export"), default="auto",
                   help="PyTorch models: auto (torch.fx; torch.onnx.export(dynamo=True) only where fx cannot trace, "
                   "with a warning), fx (never fall back), export (always torch.onnx.export)")



def _analysis_args(p) -> None:
    """The model, its measurement data and optional labels: what every `analyze` command reads."""
    p.add_argument("model", help="FILE.onnx, TorchScript FILE.pt, or MODULE:CALLABLE")
    _torch_args(p)
    p.add_argument("--calib", required=True, metavar="FILE.npy|DIR", help="inputs to measure on")
    p.add_argument("--calib-limit", type=_positive_int, metavar="N", default=64, help="samples to use")
    p.add_argument("--resize", type=_positive_int, default=256, help="image folder: resize the short side to this")
    p.add_argument("--crop", type=_positive_int, default=224, help="image folder: center crop size")
    p.add_argument("--mean", default="0.485,0.456,0.406", help="image folder: per-channel mean after scaling to "
                   "[0,1] (EfficientNet-Lite0 needs 0.5,0.5,0.5)")
    p.add_argument("--std", default="0.229,0.224,0.225", help="image folder: per-channel std")
    p.add_argument("--eval", metavar="LABELS.npy", help="integer labels for the samples: report top-1 too")
    p.add_argument("--device", default="cpu", help="where the trials run: auto, cpu, cuda, cuda:N, mps")

TRAINING_COMMANDS = ("convert", "finetune", "lottery")  # those that may train: under torchrun they join its group


def _writer() -> bool:
    """Whether this process writes the outputs (rank 0 under torchrun; always otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from graphopt.training.finetune import is_writer

    return is_writer()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="graphopt: %(levelname)s: %(message)s", stream=sys.stderr)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from graphopt.util import tune_allocator

    tune_allocator()  # our own process: keep large freed blocks for reuse (see its doc)
    try:
        check_outputs(args)
        model = getattr(args, "model", None) or (args.input if args.command == "convert" else None)
        if isinstance(model, str):
            precheck_model(model, args)  # a wrong input is refused before onnx or torch is imported
        if args.command in TRAINING_COMMANDS and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from graphopt.training.finetune import join_torchrun

            join_torchrun()  # under torchrun: one process group, each rank its share of every batch
        return {"convert": cmd_convert, "passes": cmd_passes, "inspect": cmd_inspect, "demo": cmd_demo,
                "analyze": cmd_analyze, "finetune": cmd_finetune, "lottery": cmd_lottery, "compress": cmd_compress,
                "decompress": cmd_decompress}[args.command](args)
    except BrokenPipeError:  # e.g. `graphopt passes | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        if not _writer():  # under torchrun every rank fails alike: rank 0 says why
            return 1
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, (GraphOptError, OSError)):
            where = f" in pass '{e.graphopt_pass}'" if getattr(e, "graphopt_pass", None) else ""
            msg = f"internal error{where}: {type(e).__name__}: {msg} (a bug in graphopt; rerun with --debug for the traceback)"
        if isinstance(e, (UsageError, PipelineError)):  # the command line itself is wrong
            print(f"graphopt {args.command}: usage error: {msg}", file=sys.stderr)
            return 2
        print(f"graphopt: error: {msg}", file=sys.stderr)
        return 1
    finally:
        if args.command in TRAINING_COMMANDS and "torch" in sys.modules:
            import torch

            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------- helpers
_INPUTS = {"input": "the input model", "model": "the input model", "calib": "--calib", "weights": "--weights",
           "teacher": "--teacher", "train": "--train", "train_labels": "--train-labels", "data": "--data",
           "labels": "--labels", "eval": "--eval", "val_data": "--val-data", "val_labels": "--val-labels",
           "plans": "--plans"}


def _outputs(args) -> list[tuple[str, str]]:
    """(path, what) for every file this command will write."""
    outs = []
    if getattr(args, "output", None):
        outs.append((args.output, "-o"))
        if args.command == "convert" and args.external_data:
            outs.append((args.output + ".data", "-o's external data"))
    if args.command == "convert" and args.report_json:
        outs.append((args.report_json, "--report-json"))
    if args.command == "inspect" and getattr(args, "plot", None):
        outs.append((args.plot_out, "--plot-out"))
    if args.command in ("analyze", "lottery") and getattr(args, "plot", None):
        outs.append((args.plot, "--plot"))
    if getattr(args, "onnx_out", None):
        outs.append((args.onnx_out, "--onnx-out"))
    if args.command == "finetune" and args.checkpoint:
        outs.append((args.checkpoint, "--checkpoint"))
    return outs


def _same_file(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)  # symlinks and hard links too
    return pa.resolve() == pb.resolve()


def check_outputs(args) -> None:
    """Refuse an output path that is one of the command's inputs (through symlinks and hard
    links too), or another of its outputs. Replacing the input model needs --overwrite."""
    outs = _outputs(args)
    for i, (o, what) in enumerate(outs):
        for o2, what2 in outs[i + 1:]:
            if _same_file(o, o2):
                raise GraphOptError(f"{what} and {what2} name the same file {o}")
        for key, label in _INPUTS.items():
            src = getattr(args, key, None)
            if not isinstance(src, str) or not src or not Path(src).exists() or Path(src).is_dir():
                continue
            if _same_file(o, src):
                if key in ("input", "model") and what == "-o" and getattr(args, "overwrite", False):
                    continue
                hint = " (add --overwrite to replace it in place)" if key in ("input", "model") and what == "-o" \
                    and hasattr(args, "overwrite") else ""
                raise GraphOptError(f"refusing to write {what} over {label} ({src}){hint}")


def load_model(path: str, args=None):
    """An .onnx file, a TorchScript archive, or MODULE:CALLABLE -> Graph."""
    precheck_model(path, args)
    input_shape = getattr(args, "input_shape", None)
    weights = getattr(args, "weights", None)
    if model_kind(path) == "torch":
        from graphopt.frontends.torch_io import load_torch_model

        return load_torch_model(path, input_shape, weights, getattr(args, "exporter", "auto"))
    from graphopt.frontends.onnx_file import load_onnx

    return load_onnx(path)


def precheck_model(path: str, args=None) -> None:
    """The input errors that need no parsing (see graphopt.frontends.sniff), answered before
    onnx or torch is imported."""
    if model_kind(path) == "torch":
        return
    if getattr(args, "input_shape", None) or getattr(args, "weights", None):
        raise UsageError("--input-shape/--weights apply to PyTorch models only; an ONNX file declares its inputs")
    precheck(path)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--{what} must be comma-separated numbers, got '{text}'") from None
    if len(vals) not in (1, 3):
        raise UsageError(f"--{what} takes 1 or 3 numbers, got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise UsageError(f"--{what} must be finite numbers, got '{text}'")
    if what == "std" and any(v <= 0 for v in vals):
        raise UsageError(f"--std must be positive, got '{text}'")
    return vals * 3 if len(vals) == 1 else vals


def load_calib(args, graph):
    """--calib as a CalibrationData, checked against the model input."""
    from graphopt.training.calibration import CalibrationData

    data = CalibrationData(args.calib, limit=args.calib_limit, resize=args.resize, crop=args.crop,
                           mean=_floats(args.mean, "mean"), std=_floats(args.std, "std"))
    if data.sample_shape is not None and len(data) == 0:
        raise GraphOptError(f"calibration data {args.calib} is empty")
    try:
        data.check_against(graph)
    except GraphOptError as e:
        raise GraphOptError(f"{args.calib}: {e}") from None
    return data


def load_labels(path: str, n_samples: int, samples: str, exact: bool = True):
    """Integer class labels from a .npy, validated against the ``n_samples`` samples of
    ``samples`` (a file or folder name for the message): 1-D, integer, and one per sample (or,
    with ``exact=False``, at least one per sample: the first ``n_samples`` are used, as for
    ``--calib-limit``). The one labels loader of the CLI (training, validation and --eval)."""
    import numpy as np

    if not Path(path).is_file():
        raise GraphOptError(f"labels file not found: {path}")
    try:
        y = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise GraphOptError(f"{path}: cannot read labels: {e}") from None
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise GraphOptError(f"{path}: labels must be a 1-D integer array, not {y.dtype}{list(y.shape)}")
    if len(y) < n_samples or (exact and len(y) != n_samples):
        raise GraphOptError(f"{samples} has {n_samples} samples but {path} has {len(y)} labels")
    return y[:n_samples]


def load_xy(x_path: str, y_path: str | None, graph):
    """Training inputs (memory-mapped .npy, checked against the model input) and optional
    integer labels, for `convert --train`, `finetune --data` and `lottery --data/--val-data`."""
    import numpy as np

    from graphopt.training.calibration import CalibrationData

    if not Path(x_path).is_file():
        raise GraphOptError(f"training data file not found: {x_path}")
    try:
        x = np.load(x_path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise GraphOptError(f"cannot read training data: {e}") from None
    try:
        CalibrationData(x).check_against(graph)
    except GraphOptError as e:
        raise GraphOptError(f"{x_path}: {e}") from None
    return x, (load_labels(y_path, len(x), x_path) if y_path else None)


def finetune_config(args, **fixed):
    """The FinetuneConfig of a command's training flags (the ones it has), with ``fixed``
    settings on top: the one place the CLI turns flags into a training recipe."""
    from graphopt.training.finetune import FinetuneConfig

    flags = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "optimizer": "optimizer",
             "weight_decay": "weight_decay", "quant_weight_decay": "quant_weight_decay", "temperature": "temperature",
             "kd_weight": "kd_weight", "checkpoint": "checkpoint", "resume": "resume", "max_steps": "max_steps", "device": "device",
             "amp": "amp", "lr_schedule": "lr_schedule", "warmup": "warmup"}
    opts = {field: getattr(args, flag) for field, flag in flags.items() if hasattr(args, flag)}
    if hasattr(args, "freeze_bn"):
        opts["train_bn"] = not args.freeze_bn
    return FinetuneConfig(**{**opts, **fixed})


def load_train(args, graph):
    """--train / --train-labels as TrainingData."""
    from graphopt.passmanager import TrainingData

    if not args.train:
        if args.train_labels:
            raise UsageError("--train-labels needs --train")
        return None
    return TrainingData(*load_xy(args.train, args.train_labels, graph))


# ---------------------------------------------------------------------------- commands
def cmd_convert(args) -> int:
    from graphopt.api import _pipeline_text, check_format, run
    from graphopt.passmanager import Context, DumpIRInstrument, TimingInstrument
    from graphopt.pipeline import parse_pipeline

    pipeline = parse_pipeline(_pipeline_text(args.pipeline, args.preset))  # before reading the model: fail fast
    check_format(pipeline, args.format)

    t0 = time.perf_counter()
    graph = load_model(args.input, args)
    ctx = Context(calib=load_calib(args, graph) if args.calib else None, train=load_train(args, graph),
                  teacher=load_model(args.teacher) if args.teacher else None, device=args.device)
    timing = TimingInstrument()
    report = run(graph, pipeline, ctx, args.output, args.format, input_name=args.input,
                 input_bytes=os.path.getsize(args.input) if os.path.isfile(args.input) else None,
                 load_s=time.perf_counter() - t0, report_samples=args.report_samples, kernels=not args.no_report,
                 verify_each=args.verify_each,
                 instruments=[timing] + ([DumpIRInstrument(args.dump_ir)] if args.dump_ir else []),
                 external_data=True if args.external_data else None, writer=_writer(),
                 accuracy_level=args.accuracy_level)
    if not _writer():  # under torchrun rank 0 writes the model and the report
        return 0
    print(report.summary())
    if args.report_json:
        report.write_json(args.report_json)
    if args.timing:
        print(timing.report())
    return 0


def _short_type(tp) -> str:
    import typing

    origin, args_ = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args_)
    if origin is list:
        return f"list[{_short_type(args_[0])}]"
    if args_ and type(None) in args_:
        return _short_type(next(a for a in args_ if a is not type(None))) + "|none"
    return getattr(tp, "__name__", str(tp))


def _catalogue_key() -> str:
    """What `graphopt passes` prints depends only on the installed code: its version and the
    sources of graphopt and of the pass library (path, size, mtime), hashed. Standard library
    only: computing it imports neither onnx nor torch."""
    import hashlib
    import importlib.util

    h = hashlib.sha256(__version__.encode())
    lib = importlib.util.find_spec("graphopt.passes")
    roots = [Path(__file__).parent, *(Path(p) for p in (lib.submodule_search_locations or []))] if lib else \
        [Path(__file__).parent]
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cmd_passes(args) -> int:
    """The catalogue, from a cache keyed by the installed sources when there is one (building it
    imports the pass library, torch and onnx included: about 2 s; reading it, milliseconds)."""
    import io
    from contextlib import redirect_stdout

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphopt" / \
        f"passes-{_catalogue_key()}.txt"
    try:
        sys.stdout.write(cache.read_text())
        return 0
    except OSError:
        pass
    buf = io.StringIO()
    with redirect_stdout(buf):
        _print_catalogue()
    text = buf.getvalue()
    sys.stdout.write(text)
    try:  # best effort: a read-only home just means no cache
        from graphopt.atomic import atomic_paths

        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_paths(str(cache)) as (tmp,):
            Path(tmp).write_text(text)
    except OSError:
        pass
    return 0


def _print_catalogue() -> None:
    import dataclasses

    from graphopt.passmanager import registry
    from graphopt.pipeline import format_value, presets

    for name, cls in registry().items():
        order = [f"after {', '.join(cls.after)}"] * bool(cls.after) + [f"before {', '.join(cls.before)}"] * bool(
            cls.before)
        print(f"{name}" + (f"  ({'; '.join(order)})" if order else "") + f"\n    {cls.summary()}")
        hints = cls.option_types()
        for f in cls.options():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            tp = _short_type(hints[f.name])
            print(f"    {f.name}: {tp} = {format_value(default)}  -- {f.metadata.get('doc', '')}")
    from graphopt.quantizers import schemes

    print("\nquantizer schemes (quantize{weights=SPEC,acts=SPEC}):")
    for name, q in schemes().items():
        print(f"  {name:<10} {q.doc}")
    print("\npresets:")
    for name, (text, doc) in presets().items():
        print(f"  {name:<10} {text}\n  {'':<10} ({doc})")


def cmd_inspect(args) -> int:
    from graphopt.analysis import human, layer_table

    graph = load_model(args.model, args)
    if args.plot and not args.ranges:
        raise UsageError("--plot goes with --ranges")
    if args.ranges:
        return _inspect_ranges(graph, args)
    if args.sparsity:
        return _inspect_sparsity(graph)
    if args.compression:
        return _inspect_compression(args.model)
    rows = layer_table(graph)
    w = max([len(r.name) for r in rows] + [5])
    w = min(w, 60)
    wi = max([len(r.inputs) for r in rows] + [5])  # shapes are never cut: columns widen instead
    wo = max([len(r.output) for r in rows] + [6])
    print(f"{'layer':<{w}} {'op':<18} {'input':<{wi}} {'output':<{wo}} {'params':>9} {'MACs':>9}")
    for r in rows:
        name = r.name if len(r.name) <= w else "…" + r.name[-(w - 1):]
        print(f"{name:<{w}} {r.op:<18} {r.inputs:<{wi}} {r.output:<{wo}} {human(r.params):>9} {human(r.macs):>9}")
    macs = [r.macs for r in rows]
    unknown = sum(m is None for m in macs)
    print(f"total: {len(rows)} nodes, {human(graph.num_params())} params, {human(sum(m or 0 for m in macs))} MACs "
          f"per sample" + (f" ({unknown} nodes with unknown shapes not counted)" if unknown else ""))
    return 0


def _inspect_sparsity(graph) -> int:
    from graphopt.analysis import human
    from graphopt.passmanager import pass_library

    rows = pass_library().sparsity.sparsity_report(graph)
    if not rows:
        raise GraphOptError("the model has no Conv/Gemm/MatMul layer with constant weights")
    w = min(max(len(r["layer"]) for r in rows), 50)
    print(f"{'layer':<{w}} {'params':>8} {'nonzero':>8} {'sparsity':>8} {'MACs':>8} {'nz MACs':>8} "
          f"{'dense KB':>8} {'sparse KB':>9}")
    for r in rows:
        name = r["layer"] if len(r["layer"]) <= w else "…" + r["layer"][-(w - 1):]
        print(f"{name:<{w}} {human(r['params']):>8} {human(r['nonzero']):>8} {100 * r['sparsity']:7.1f}% "
              f"{human(r['macs']):>8} {human(r['nonzero_macs']):>8} {r['params'] * 4 / 1024:8.1f} "
              f"{r['stored_bits'] / 8192:9.1f}" + (f"  ({r['nm']})" if r["nm"] else ""))
    p, nz = sum(r["params"] for r in rows), sum(r["nonzero"] for r in rows)
    m, nzm = sum(r["macs"] for r in rows), sum(r["nonzero_macs"] for r in rows)
    enc = sum(r["stored_bits"] for r in rows)
    print(f"total: {human(p)} weights, {human(nz)} nonzero ({100 * (1 - nz / max(p, 1)):.1f}% sparse), "
          f"{human(nzm)} of {human(m)} MACs nonzero; FP32 {p * 4 / 1e6:.3f} MB dense, {enc / 8e6:.3f} MB compressed "
          f"(each layer in its smallest form: float32 values + 4-bit relative indices, N:M values + log2(M)-bit "
          f"indices, or dense)")
    print("note: onnxruntime runs the exported model at dense speed (it has no sparse convolution)")
    return 0


def _onnx_model(path: str):
    """The ONNX ModelProto at ``path`` (compress and inspect --compression read files as written)."""
    import onnx

    if Path(path).suffix.lower() != ".onnx":
        raise GraphOptError(f"{path}: compression reads an ONNX file (export the model with graphopt convert first)")
    try:
        return onnx.load(path)
    except Exception as e:
        raise GraphOptError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None


def _inspect_compression(path: str) -> int:
    from graphopt import compressed

    model = _onnx_model(path)
    rows = compressed.report(model)
    if not rows:
        raise GraphOptError("the model has no Conv/Gemm/MatMul layer with constant weights")
    data = compressed.encode(model)
    print(compressed.format_report(rows, compressed.sizes(model, len(data))))
    return 0


def cmd_compress(args) -> int:
    from graphopt import compressed

    model = _onnx_model(args.model)
    rows = compressed.report(model)
    size = compressed.write(model, args.output, huffman=not args.no_huffman, gap_bits=args.gap_bits)
    print(compressed.format_report(rows, compressed.sizes(model, size)))
    print(f"wrote {args.output} ({size / 1e3:.1f} KB{', fixed-width streams' if args.no_huffman else ''})")
    return 0


def cmd_decompress(args) -> int:
    from graphopt import compressed
    from graphopt.atomic import atomic_paths

    model = compressed.read(args.input)
    if args.dense:
        model = compressed.dense_model(model)
    with atomic_paths(args.output) as (tmp,):
        with open(tmp, "wb") as fh:
            fh.write(model.SerializeToString())
    print(f"wrote {args.output} ({len(model.graph.initializer)} tensors" + (", palettes expanded" if args.dense else
                                                                             ", bit for bit as compressed") + ")")
    return 0


def _inspect_ranges(graph, args) -> int:
    import numpy as np

    from graphopt.analysis import weight_ranges

    rows = weight_ranges(graph)
    if not rows:
        raise GraphOptError("the model has no Conv/Gemm/MatMul layer with constant weights")
    w = min(max(len(r["layer"]) for r in rows), 60)
    print(f"{'layer':<{w}} {'op':<10} {'ch':>5} {'spread p99/p1':>14} {'max':>9} {'min>0':>9} {'zero ch':>7}")
    for r in rows:
        name = r["layer"] if len(r["layer"]) <= w else "…" + r["layer"][-(w - 1):]
        print(f"{name:<{w}} {r['kind']:<10} {r['channels']:5d} {r['spread']:14.1f} {r['max']:9.3g} "
              f"{r['min_nonzero']:9.3g} {r['zero_channels']:7d}")
    dw = [r["spread"] for r in rows if r["kind"] == "depthwise" and np.isfinite(r["spread"])]
    allsp = [r["spread"] for r in rows if np.isfinite(r["spread"])]
    print(f"median spread: all layers {np.median(allsp):.1f}" + (f", depthwise {np.median(dw):.1f}" if dw else ""))
    if args.plot:
        from graphopt.analysis import plot_channel_ranges

        plot_channel_ranges(graph, args.plot, args.plot_out)
        print(f"wrote {args.plot_out}")
    return 0


def _labels(args, data):
    """--eval's labels, one per calibration sample used (the first ones, under --calib-limit)."""
    return load_labels(args.eval, len(data), args.calib, exact=False) if args.eval else None


def cmd_analyze(args) -> int:
    from graphopt.training.device import calibrating_on

    with calibrating_on(getattr(args, "device", None)):  # the scans and their calibration run there
        return _analyze(args)


def _analyze(args) -> int:
    from graphopt import analyze

    graph = load_model(args.model, args)
    if args.analysis == "columns":
        analyze.columns(graph, array=args.array, alpha=args.alpha, gamma=args.gamma, window=args.window,
                        plans=args.plans, out=args.output, onnx_out=args.onnx_out, plot=args.plot, layer=args.layer,
                        source=os.path.basename(args.model))
        return 0
    data = load_calib(args, graph)
    labels = _labels(args, data)
    if args.analysis == "blocks":
        analyze.blocks(graph, data, labels)
    elif args.analysis == "bits":
        try:
            widths = [int(w) for w in args.widths.split(",")]
        except ValueError:
            raise GraphOptError(f"--widths must be comma-separated bit counts, got '{args.widths}'") from None
        analyze.bits(graph, data, labels, scheme=args.scheme, widths=widths, budget=args.budget,
                     act_bits=args.act_bits, method=args.method, prepare=args.prepare, plot=args.plot)
    elif args.analysis == "sparsity":
        try:
            levels = [float(v) for v in args.levels.split(",")]
        except ValueError:
            raise UsageError(f"--levels must be comma-separated sparsities, got '{args.levels}'") from None
        analyze.sparsity(graph, data, labels, levels=levels, sparsity=args.sparsity, target=args.target,
                         skip=[p for p in args.skip.split(",") if p], max_samples=args.calib_limit,
                         prepare=args.prepare, plot=args.plot)
    else:
        try:
            ratios = tuple(float(r) for r in args.ratios.split(","))
        except ValueError:
            raise GraphOptError(f"--ratios must be comma-separated numbers, got '{args.ratios}'") from None
        analyze.channels(graph, data, labels, ratios=ratios, criterion=args.criterion, round_to=args.round_to,
                         plot=args.plot)
    return 0


def cmd_finetune(args) -> int:
    from graphopt.serialize import save_onnx
    from graphopt.training.finetune import finetune

    student = load_model(args.model, args)
    x, y = load_xy(args.data, args.labels, student)
    teacher = load_model(args.teacher) if args.teacher else None
    cfg = finetune_config(args)
    stats = finetune(student, x, y, teacher, cfg)
    if not _writer():  # under torchrun rank 0 writes the model
        return 130 if stats["interrupted"] else 0
    save_onnx(student, args.output)
    losses = ", ".join(f"{v:.4f}" for v in stats["loss"])
    print(f"fine-tuned {stats['steps']} steps over {stats['epochs']} epoch(s) on {stats['world_size']} process(es); "
          f"loss per epoch: {losses}" + (" (interrupted: kept the last completed step)" if stats["interrupted"] else ""))
    print(f"wrote {args.output}")
    return 130 if stats["interrupted"] else 0


def cmd_lottery(args) -> int:
    import numpy as np

    from graphopt.serialize import save_onnx
    from graphopt.training.lottery import CONTROLS, format_table, lottery_ticket, plot_curves

    controls = [c.strip() for c in args.controls.split(",") if c.strip()]
    bad = [c for c in controls if c not in CONTROLS]
    if bad or not controls:
        raise UsageError(f"--controls takes {', '.join(CONTROLS)}, not '{args.controls}'")
    if (args.val_data is None) != (args.val_labels is None):
        raise UsageError("--val-data and --val-labels go together")
    graph = load_model(args.model, args)
    x, y = load_xy(args.data, args.labels, graph)
    evaluate = None
    if args.val_data:
        xv, yv = load_xy(args.val_data, args.val_labels, graph)
        from graphopt.scan import top1

        def evaluate(g) -> float:
            return round(top1(g, np.asarray(xv, np.float32), yv), 2)
    cfg = finetune_config(args, kd_weight=0.0)  # labels only: no teacher in a lottery run
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    runs, first = {}, None
    ticket = state / f"ticket-rewind{args.rewind}"
    for c in sorted(controls, key=lambda c: c != "ticket"):  # the controls follow the ticket's masks
        g = graph.copy()
        runs[c] = lottery_ticket(g, x, y, rounds=args.rounds, rate=args.rate, rewind_step=args.rewind, control=c,
                                 config=cfg, evaluate=evaluate, state=state / f"{c}-rewind{args.rewind}",
                                 ticket=None if c == "ticket" else ticket)
        if first is None:
            first, first_name = g, c
    if not _writer():  # under torchrun rank 0 prints and writes
        return 0
    print(f"lottery tickets: {args.rounds} rounds, {100 * args.rate:g}% of survivors pruned per round, rewind to step "
          f"{args.rewind}, {args.epochs} epoch(s) per round; " + ("top-1 % on --val-data" if evaluate else
                                                                   "training loss (no --val-data)"))
    print(format_table(runs))
    if args.output:
        save_onnx(first, args.output)
        print(f"wrote {args.output} ({first_name}, round {args.rounds})")
    if args.plot:
        plot_curves(args.plot, runs, ylabel="top-1 %")
        print(f"wrote {args.plot}")
    return 0


def cmd_demo(args) -> int:
    from graphopt.demo import run_demo

    return run_demo(args.output, args.pipeline)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
