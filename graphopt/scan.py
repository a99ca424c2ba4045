"""Scans: the one owner of "change one unit, measure the damage".

A ``Scan`` runs the float graph once over the samples and keeps its outputs (the baseline).
Each trial then changes one unit and is measured against that baseline with one metric:

* ``error``: the output's mean squared error relative to the baseline's mean square (its
  square root is the relative L2 error ``||y - y0|| / ||y0||``), or, with ``labels``, the drop
  in top-1 points against the baseline's top-1;
* ``top1``: the trial's top-1 in percent, with ``labels``.

Two kinds of trial:

* ``swap(value_name, array)``: a constant replaced in place in the already-built torch module
  (a layer's weights at another bit width, sparsity or codebook size): one forward pass;
* ``transform(graph)``: a transformed copy of the graph (channels folded away, a residual block
  removed, a column grouping), built and run.

Trials give rows of one schema, ``{"unit", "level", "cost", "error"}`` plus what the adapter
adds; ``graphopt.allocate`` chooses a level per unit under a budget. choose-bits,
``prune-weights{scope=sensitivity}``, prune-channels' sensitivity and prune-blocks' block scan
are adapters over it.

Scans run on the calibration device (``graphopt.training.device.calibrating_on``: a pipeline's
``Context(device=...)``, ``graphopt analyze ... --device``); samples, modules and outputs live
there, the metrics come back as Python floats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt.ir import Graph


class Scan:
    """The baseline of ``graph`` on ``data`` (the first ``max_samples`` samples), computed once."""

    def __init__(self, graph: Graph, data, labels: np.ndarray | None = None, max_samples: int | None = None):
        import torch

        from graphopt.backends.torch_module import to_torch
        from graphopt.training.calibration import CalibrationData
        from graphopt.training.device import calibration_device

        self.device = calibration_device()
        data = data if isinstance(data, CalibrationData) else CalibrationData(data)
        data.check_against(graph)
        batches, n = [], 0
        for b in data:
            if max_samples is not None and n >= max_samples:
                break
            t = data.tensors(b)
            if max_samples is not None:
                t = tuple(x[: max_samples - n] for x in t)
            batches.append(tuple(x.to(self.device) for x in t))
            n += len(t[0])
        self.graph, self.batches, self.n_samples = graph, batches, n
        self.module = to_torch(graph).eval().to(self.device)
        self.params = dict(self.module.named_parameters())
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels)[:n]).long().to(self.device)
        with torch.no_grad():
            self.ref = [self.module(*b) for b in batches]
        self.ref_ss = float(sum(r.double().pow(2).sum() for r in self.ref))
        self.ref_top1 = None if self.labels is None else self._top1(self.ref)

    # -- metric ----------------------------------------------------------------
    def _top1(self, outs) -> float:
        import torch

        pred = torch.cat([o.reshape(len(o), -1).argmax(1) for o in outs])
        return float(pred.eq(self.labels).double().mean()) * 100

    def measure(self, outs) -> dict[str, float]:
        """The metric of a trial's outputs (one tensor per batch) against the baseline."""
        se = float(sum((o.double() - r.double()).pow(2).sum() for o, r in zip(outs, self.ref)))
        out = {"rel_mse": se / max(self.ref_ss, 1e-30)}
        if self.labels is not None:
            out["top1"] = self._top1(outs)
            out["error"] = self.ref_top1 - out["top1"]
        else:
            out["error"] = out["rel_mse"]
        return out

    # -- trials ----------------------------------------------------------------
    def run(self, module=None) -> list:
        import torch

        m = module if module is not None else self.module
        with torch.no_grad():
            return [m(*b) for b in self.batches]

    def swap(self, value_name: str, array: np.ndarray) -> dict[str, float]:
        """Trial: the constant ``value_name`` replaced by ``array`` in the baseline module."""
        import torch

        p = self.params[self.module.param_names[value_name]]
        keep = p.data.clone()
        p.data.copy_(torch.from_numpy(np.ascontiguousarray(array, np.float32)))
        try:
            return self.measure(self.run())
        finally:
            p.data.copy_(keep)

    def transform(self, graph: Graph) -> dict[str, float]:
        """Trial: a transformed copy of the graph, built and run on the same samples."""
        from graphopt.backends.torch_module import to_torch

        return self.measure(self.run(to_torch(graph).eval().to(self.device)))


def row(unit: str, level: Any, cost: float, trial: dict[str, float], **extra) -> dict[str, Any]:
    """A scan row of the one schema: the unit, the level tried, what it costs, the error."""
    return {"unit": unit, "level": level, "cost": cost, "error": trial["error"], **extra}


def top1(graph: Graph, data, labels: np.ndarray) -> float:
    """The graph's top-1 (%) on ``data`` against ``labels``: the baseline of a labelled scan."""
    return Scan(graph, data, labels).ref_top1


def plot_units(path, rows: list[dict], *, y: str = "error", xlabel: str, ylabel: str, title: str,
               x_scale: float = 1.0, log_y: bool = False, highlight=()) -> None:
    """PNG of scan rows: one curve per unit, ``row[y]`` against ``row['level'] * x_scale``. With
    ``highlight``, those units are drawn bold and labelled and the others thin and gray; without,
    every unit gets a colour (and a legend when there are at most 12). The one plot of a scan
    (``graphopt analyze sensitivity``, ``graphopt analyze sparsity``)."""
    from graphopt.plotting import pyplot, save_png

    plt = pyplot("--plot")
    units = list(dict.fromkeys(r["unit"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 5))
    for u in units:
        rs = sorted((r for r in rows if r["unit"] == u), key=lambda r: r["level"])
        xs, ys = [r["level"] * x_scale for r in rs], [r[y] for r in rs]
        if log_y:
            ys = np.maximum(ys, 1e-9)
        if highlight:
            bold = u in highlight
            ax.plot(xs, ys, "-o" if bold else "-", lw=2.2 if bold else 0.8, alpha=1.0 if bold else 0.5,
                    label=str(u) if bold else None, color=f"C{3 * (list(highlight).index(u) == 0)}" if bold else "gray")
        else:
            ax.plot(xs, ys, marker="o", label=str(u)[:40])
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if highlight or len(units) <= 12:
        ax.legend(fontsize=6 if not highlight else 8)
    fig.tight_layout()
    save_png(fig, path)
