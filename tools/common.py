"""Helpers shared by the benchmarks: data from ../shared, timing."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("GRAPHOPT_SHARED", ROOT.parent / "shared"))
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN, CIFAR_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def need_shared(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"benchmark needs {path} (../shared is not present)")
    return path


def imagenet_sample(limit: int | None = None, mean=(0.5,) * 3, std=(0.5,) * 3) -> tuple[np.ndarray, np.ndarray]:
    """The 500 imagenet-sample images, preprocessed as models/README.md says, and labels."""
    from graphopt.training.data import load_image_batch

    folder = need_shared(SHARED / "data" / "imagenet-sample")
    rows = list(csv.DictReader(open(folder / "labels.csv")))[:limit]
    cache = Path(tempfile.gettempdir()) / f"graphopt-imagenet-{len(rows)}-{hashlib.md5(str((mean, std)).encode()).hexdigest()[:8]}.npz"
    if cache.is_file():
        d = np.load(cache)
        return d["x"], d["y"]
    x = load_image_batch([folder / r["file"] for r in rows], resize=256, crop=224, mean=mean, std=std)
    y = np.array([int(r["class_index"]) for r in rows])
    np.savez(cache, x=x, y=y)
    return x, y


def cifar10(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the JPEG tarball as uint8 NHWC + labels (decoded once, cached in /tmp).

    The archive lists the images class by class, so the test split comes back in a fixed
    shuffled order: any prefix (``--limit N``) is then a sample of every class, not of the first
    one or two. The training split keeps the archive's order (fine-tuning shuffles it anyway).
    """
    from PIL import Image

    tar_path = need_shared(SHARED / "data" / "cifar10" / f"{split}.tar.gz")
    cache = Path(tempfile.gettempdir()) / f"graphopt-cifar10-{split}.npz"
    if cache.is_file():
        d = np.load(cache)
        return _shuffled(d["x"], d["y"], split)
    xs, ys = [], []
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if not m.isfile() or not m.name.endswith(".jpg"):
                continue
            cls = Path(m.name).parent.name
            with Image.open(io.BytesIO(tf.extractfile(m).read())) as im:
                xs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            ys.append(CIFAR_CLASSES.index(cls))
    x, y = np.stack(xs), np.array(ys)
    np.savez(cache, x=x, y=y)
    return _shuffled(x, y, split)


def _shuffled(x: np.ndarray, y: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split != "test":
        return x, y
    perm = np.random.default_rng(0).permutation(len(y))
    return x[perm], y[perm]


def cifar_normalize(x_uint8: np.ndarray) -> np.ndarray:
    x = x_uint8.astype(np.float32) / 255.0
    x = (x - np.array(CIFAR_MEAN, np.float32)) / np.array(CIFAR_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def median_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paired_latency_ratios(ref, model, feed_ref: dict, feed_model: dict, rounds: int, inner: int = 0) -> np.ndarray:
    """Latency ratio model/ref of two onnxruntime sessions, one per round.

    Each round times both sides back to back (the order alternates between rounds), each side as
    the best of `inner` runs (default: about 0.2 s worth), so the slow drift of a shared machine
    hits both sides of a ratio alike. Summarize with the median and quartiles of the result.
    """

    def best(s, f, n):
        t = []
        for _ in range(n):
            t0 = time.perf_counter()
            s.run(None, f)
            t.append(time.perf_counter() - t0)
        return min(t)

    one = best(ref, feed_ref, 2)  # warm-up, and the size of one run
    best(model, feed_model, 2)
    inner = inner or max(3, min(20, int(0.2 / max(one, 1e-4))))
    out = []
    for i in range(rounds):
        if i % 2:
            tm, tr = best(model, feed_model, inner), best(ref, feed_ref, inner)
        else:
            tr, tm = best(ref, feed_ref, inner), best(model, feed_model, inner)
        out.append(tm / tr)
    return np.array(out)


def ratio_summary(r: np.ndarray, macs_ratio: float) -> str:
    """'0.612 (0.60-0.62), realized 78% (76-80%)': median latency ratio, quartiles, MAC share."""
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    share = lambda v: (1 - v) / (1 - macs_ratio)  # noqa: E731
    return f"{med:.3f} ({q1:.3f}-{q3:.3f}), realized {share(med):.0%} ({share(q3):.0%}-{share(q1):.0%})"


def ort_session(model, threads: int | None = None, config: dict | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: unused-initializer notices would drown the tables
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    if threads:
        so.intra_op_num_threads = threads
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def batched(fn, x: np.ndarray, batch: int = 100) -> np.ndarray:
    return np.concatenate([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def torch_logits(module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """``module``'s outputs on ``x``, batched, without gradients."""
    import torch

    with torch.no_grad():
        return batched(lambda b: module(torch.from_numpy(b)).numpy(), x, batch)


def ort_logits(path, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """The first output of the ONNX file ``path`` in onnxruntime on ``x``, batched."""
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    return batched(lambda b: sess.run(None, {name: b})[0], x, batch)


def top1_pct(logits: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent, rounded to 2 decimals."""
    return round(100 * float((logits.argmax(1) == y).mean()), 2)


def agree_pct(a: np.ndarray, b: np.ndarray) -> float:
    """Share of samples (percent, 2 decimals) on which two models' top-1 classes agree."""
    return round(100 * float((a.argmax(1) == b.argmax(1)).mean()), 2)


def load_results(path: Path) -> dict:
    """A benchmark's results file (resumable rows), or {} before its first row."""
    return json.loads(path.read_text()) if path.exists() else {}


def save_results(path: Path, res: dict) -> None:
    """Write a benchmark's results file atomically (a stop mid-write keeps the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(res, indent=1, sort_keys=True))
    os.replace(tmp, path)


def key_of(row: str, epochs: int, default: int = 3) -> str:
    """A training row's results key and checkpoint name: the row, or ``row@Nep`` at another budget
    than its table's default (both stay in the table; neither resumes the other's checkpoint)."""
    return row if epochs == default else f"{row}@{epochs}ep"


def base_of(key: str) -> str:
    """The row a results key belongs to (``row@Nep`` -> ``row``): the inverse of ``key_of``."""
    return key.split("@")[0]


def train_timing(secs: float, ran: int, prev: dict) -> dict:
    """A training row's timing: wall seconds, seconds per epoch over the ``ran`` epochs this call
    trained (a resumed run trains only the rest) and torch's thread count. A call that trained
    nothing (re-exported from a finished checkpoint) keeps ``prev``, the row's recorded timing."""
    import torch

    if not ran:
        return {k: prev.get(k) for k in ("wall_s", "s_per_epoch", "threads")}
    return {"wall_s": round(secs, 1), "s_per_epoch": round(secs / ran, 1), "threads": torch.get_num_threads()}


def with_budgets(rows, res: dict) -> list[str]:
    """The results keys to tabulate, in the table's row order: each row, then its other budgets
    (``row@Nep``) in increasing epochs."""
    return [k for base in rows for k in [base] + sorted(
        (k for k in res if k.startswith(base + "@")), key=lambda k: int(k.split("@")[1][:-2]))]


# ------------------------------------------------------------------ shared by several benchmarks
PTQ_CACHE = Path(tempfile.gettempdir()) / "graphopt-zoo"


def ptq_data(model: str):
    """(calibration x, y, test x, y) of the PTQ benchmarks: EfficientNet-Lite0 calibrates on the
    first 128 imagenet-sample images and scores on the other 372; ResNet-20 calibrates on 256
    CIFAR-10 training images (seed 0) and scores on all 10,000 test images."""
    if model == "effnet":
        x, y = imagenet_sample()
        return x[:128], y[:128], x[128:], y[128:]
    xt, yt = cifar10("test")
    xtr, ytr = cifar10("train")
    idx = np.random.default_rng(0).permutation(len(ytr))[:256]
    return cifar_normalize(xtr[idx]), ytr[idx], cifar_normalize(xt), yt


# The ResNet validation split: CIFAR-10 *training* images, never reported. Positions 512..2511 of
# the seed-0 permutation of the 50,000 training images, disjoint from the PTQ calibration images
# (positions 0..255) and the QAT rows' (0..511). Every choice on the ResNet tables (defaults,
# starts, summary cells) is made on it; the test set only scores. (The pretrained FP32 model and
# the QAT rows train on these images too: the split judges post-training choices, made before
# any fine-tuning sees them.)
VAL_SPLIT = ("CIFAR-10 train, seed-0 permutation positions 512-2511 (2,000 images, disjoint from the "
             "calibration images)")


def _train_order(n: int) -> np.ndarray:
    """The seed-0 permutation of the training images: positions 0..511 calibrate, 512..2511 are
    the validation split (``VAL_SPLIT``)."""
    return np.random.default_rng(0).permutation(n)


def cifar_val() -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the validation split described by ``VAL_SPLIT``, normalized NCHW."""
    xtr, ytr = cifar10("train")
    idx = _train_order(len(ytr))[512:2512]
    return cifar_normalize(xtr[idx]), ytr[idx]


def outside_val() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibration images, training images outside the validation split, their labels),
    normalized: what a recipe search (``--tune``) trains and calibrates on."""
    xtr_u8, ytr = cifar10("train")
    perm = _train_order(len(ytr))
    keep = np.setdiff1d(np.arange(len(ytr)), perm[512:2512])  # everything but the validation split
    return cifar_normalize(xtr_u8[perm[:512]]), cifar_normalize(xtr_u8[keep]), ytr[keep]


# ------------------------------------------------------------------ recipe searches (--tune)
def tune_record(path: Path, key: str, epochs: int, **about) -> dict:
    """A recipe search's record under ``key`` in the results file at ``path``: the stored one
    (an interrupted search resumes its finished candidates) unless it ran at another budget."""
    rec = load_results(path).get(key) or {}
    if rec.get("epochs") != epochs:
        rec = {"epochs": epochs, "candidates": {}}
    rec.update(chosen_on=VAL_SPLIT, **about)
    return rec


def tune_candidate(path: Path, key: str, rec: dict, name: str, cand: dict, epochs: int, score) -> dict:
    """One candidate of a recipe search: ``score()`` trains it and returns its top-1 on the
    validation split. A GraphOptError (a diverging candidate) records it as failed: it loses and
    the others still run. Each candidate is saved as it finishes, and a finished one is not rerun."""
    from graphopt.errors import GraphOptError

    if name in rec["candidates"]:
        return rec["candidates"][name]
    t = time.perf_counter()
    try:
        top1 = score()
    except GraphOptError as e:
        top1, rec.setdefault("failed", {})[name] = None, str(e).splitlines()[0]
    rec["candidates"][name] = {**cand, "epochs": epochs, "val_top1": top1, "wall_s": round(time.perf_counter() - t, 1)}
    res = load_results(path)
    res[key] = rec
    save_results(path, res)
    print(f"{key} {name}: val top-1 {top1}", flush=True)
    return rec["candidates"][name]


def tune_best(key: str, rec: dict, cands: list[dict]) -> dict:
    """The candidate with the best validation top-1; the first (the current recipe) keeps its
    place on a tie."""
    done = [c for c in cands if c["val_top1"] is not None]
    if not done:
        raise SystemExit(f"{key}: every candidate failed: {rec.get('failed')}")
    return max(done, key=lambda c: c["val_top1"])


def tune_widen(key: str, rec: dict, cands: list[dict], param: str, ratio: float, run, most: int = 3) -> dict:
    """The best of ``cands`` once it is bracketed along ``param``: while the best candidate's
    value is the grid's smallest (largest), ``run(value, best)`` trains one more candidate a
    factor ``ratio`` beyond it, at most ``most`` times (a best on the edge may lie outside the
    grid). A failed candidate beyond the edge brackets it too."""
    for _ in range(most):
        best = tune_best(key, rec, cands)
        vals = [c[param] for c in cands]
        if min(vals) == max(vals) or best[param] not in (min(vals), max(vals)):
            break  # one value (no direction to widen in), or the best is bracketed
        beyond = best[param] / ratio if best[param] == min(vals) else best[param] * ratio
        cands.append(run(float(f"{beyond:.3g}"), best))
    return tune_best(key, rec, cands)


def fp32_file(model: str) -> Path:
    if model == "effnet":
        return need_shared(SHARED / "models" / "efficientnet_lite0.onnx")
    out = PTQ_CACHE / "resnet20_fp32.onnx"
    if not out.exists():
        import torch
        from cifar_resnet import resnet_cifar

        import graphopt

        out.parent.mkdir(parents=True, exist_ok=True)
        g = graphopt.from_torch(resnet_cifar(20), torch.zeros(1, 3, 32, 32))
        graphopt.save_onnx(g, out)
    return out


def ort_top1(path, x, y) -> float:
    """Top-1 (%, two decimals) of an ONNX file in onnxruntime."""
    return round(top1_pct(ort_logits(path, x, 250), y), 2)


def cifar_augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop with 4 pixels of zero padding and a random horizontal flip, batched."""
    n, c, h, w = x.shape
    p = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))
    dy, dx = rng.integers(0, 9, n), rng.integers(0, 9, n)
    rows = (dy[:, None] + np.arange(h))[:, :, None]  # [n, h, 1]
    cols = (dx[:, None] + np.arange(w))[:, None, :]  # [n, 1, w]
    flip = rng.random(n) < 0.5
    cols = np.where(flip[:, None, None], cols[:, :, ::-1], cols)
    out = p[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None], rows[:, None], cols[:, None]]
    return np.ascontiguousarray(out, np.float32)


class OrtReader:
    """onnxruntime CalibrationDataReader over an array, batch by batch."""

    def __init__(self, x: np.ndarray, name: str, batch: int = 16):
        self.x, self.name, self.batch, self.i = x, name, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        b = self.x[self.i:self.i + self.batch]
        self.i += self.batch
        return {self.name: b}

    def rewind(self):
        self.i = 0


SUBJECTS = ["the cat", "a compiler", "my neighbour", "the old train", "this graph", "a quiet river", "the market",
            "our team", "the new phone", "a small bakery", "the weather", "every student"]
VERBS = ["likes", "breaks", "follows", "explains", "ignores", "builds", "paints", "measures", "sells", "watches"]
OBJECTS = ["the morning news", "a red bicycle", "integer kernels", "the mountain road", "old photographs",
           "a cup of tea", "the football match", "quantized weights", "the city lights", "a long novel"]
TAILS = ["", " today", " every weekend", " without any doubt", " in the rain", " before dinner", " slowly"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    return [f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)}{pick(TAILS)}." for _ in range(n)]
