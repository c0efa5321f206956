"""Inline SVG plots for the per-case section: loss curves, and distance from the float64 replay."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "font.size": 9})
# Backends often agree to the last bit: distinct dashes keep overlapping curves visible.
LINE_STYLES = {"keras": "-", "gradient_tape": "--", "torch": ":"}


def curves_svg(results: list[dict[str, Any]], replay: dict[str, Any] | None) -> str:
    """Two panels: every backend's loss with the replay's, and each backend's distance to the replay."""
    figure, (loss_axis, distance_axis) = plt.subplots(1, 2, figsize=(10, 3.2))
    figure.subplots_adjust(left=0.07, right=0.99, bottom=0.15, top=0.9, wspace=0.25)  # tight_layout costs 0.1 s
    if replay is not None:
        loss_axis.plot(replay["loss"]["epoch"], _positive(replay["loss"]["value"]), color="black",
                       linewidth=2.5, alpha=0.35, label="float64 replay")
    for result in results:
        name = f"{result['backend']}, {result['device']}"
        if result.get("curve"):
            curve = result["curve"]["loss"]
            loss_axis.plot(curve["epoch"], _positive(curve["value"]), linewidth=1.2, label=name,
                           linestyle=LINE_STYLES.get(result["backend"], "-."))
        if result.get("distance"):
            distance = result["distance"]
            distance_axis.plot(distance["epoch"], _positive(distance["value"], floor=1e-17), linewidth=1.2,
                               label=name, linestyle=LINE_STYLES.get(result["backend"], "-."))
    _finish(loss_axis, "training loss per epoch", "loss")
    _finish(distance_axis, "distance from the float64 replay", "max |param - replay|")
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _finish(axis: Any, title: str, ylabel: str) -> None:
    axis.set_title(title)
    axis.set_xlabel("epoch")
    axis.set_ylabel(ylabel)
    if axis.lines and any(max(line.get_ydata(), default=0) > 0 for line in axis.lines):
        axis.set_yscale("log")
        # Plain "1e-08" labels: the default mathtext labels cost most of a plot's rendering time.
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.0e}"))
        axis.yaxis.set_minor_formatter(NullFormatter())
    axis.grid(True, which="major", alpha=0.3)
    if axis.lines:
        axis.legend(fontsize=7)


def _positive(values: list, floor: float = 0.0) -> list[float]:
    """Log axes: None (non-finite) becomes NaN (a gap); zeros are lifted to `floor`."""
    return [float("nan") if v is None else max(v, floor) if floor else (v if v > 0 else float("nan"))
            for v in values]
