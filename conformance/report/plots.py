"""Inline SVG plots for the per-case page: loss curves, and distance from the float64 replay.

Written as plain SVG text rather than drawn with a plotting library: two line charts with a log
y axis need about a hundred lines, render in about a millisecond instead of 0.15 s per case, and
keep matplotlib's 0.6 s import off the controller, where the report is written after every
worker has finished (that time is pure wall time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from html import escape
from typing import Any

WIDTH, HEIGHT = 500, 300  # one panel without its legend, in SVG user units
LEFT, RIGHT, TOP, BOTTOM = 62, 12, 26, 40  # margins around the plotting area
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
# Backends often agree to the last bit: distinct dashes keep overlapping curves visible.
DASHES = {"keras": "", "gradient_tape": "7 3", "torch": "1.5 2.5"}
OTHER_DASH = "7 2 1.5 2"
DISTANCE_FLOOR = 1e-17  # a distance of exactly 0 is drawn here, at the bottom of the log axis


class Series:
    """One line: points (epoch, value), with None or non-positive values left as gaps."""

    def __init__(self, label: str, epochs: list[int], values: list[float | None], color: str,
                 dash: str = "", width: float = 1.2, opacity: float = 1.0) -> None:
        self.label, self.color, self.dash, self.width, self.opacity = label, color, dash, width, opacity
        self.points = [(epoch, value) for epoch, value in zip(epochs, values)]

    @property
    def stroke(self) -> str:
        """The SVG stroke attributes shared by the line and its legend sample."""
        dash = f' stroke-dasharray="{self.dash}"' if self.dash else ""
        return f'stroke="{self.color}" stroke-width="{self.width}" stroke-opacity="{self.opacity}"{dash}'


def curves_svg(results: list[dict[str, Any]], replay: dict[str, Any] | None) -> str:
    """Two panels: every backend's loss with the replay's, and each backend's distance to the replay."""
    losses: list[Series] = []
    distances: list[Series] = []
    if replay is not None:
        losses.append(Series("float64 replay", replay["loss"]["epoch"], replay["loss"]["value"], "#000000",
                             width=2.5, opacity=0.35))
    for index, result in enumerate(results):
        label, color = f"{result['backend']}, {result['device']}", COLORS[index % len(COLORS)]
        dash = DASHES.get(result["backend"], OTHER_DASH)
        if result.get("curve"):
            curve = result["curve"]["loss"]
            losses.append(Series(label, curve["epoch"], curve["value"], color, dash))
        if result.get("distance"):
            distance = result["distance"]
            values = [None if v is None else max(v, DISTANCE_FLOOR) for v in distance["value"]]
            distances.append(Series(label, distance["epoch"], values, color, dash))
    legends = [_legend(losses, HEIGHT), _legend(distances, HEIGHT)]
    height = HEIGHT + max(legend_height for _, legend_height in legends)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {2 * WIDTH} {height:.0f}" '
            f'width="100%" style="max-width:{2 * WIDTH}px" font-family="sans-serif" font-size="11" '
            f'role="img" aria-label="loss per epoch and distance from the float64 replay">'
            + _panel(losses, "training loss per epoch", "loss", 0, legends[0][0])
            + _panel(distances, "distance from the float64 replay", "max |param - replay|", WIDTH, legends[1][0])
            + "</svg>")


def rates_svg(results: list[dict[str, Any]], replay: dict[str, Any] | None) -> str:
    """One panel: the learning rate of each epoch's last step, as each framework reports it,
    over the case format's (the replay's); empty without a schedule."""
    return epoch_series_svg(results, replay, "rate", "case format (replay)", "learning rate (each epoch's last step)",
                            "rate", "learning rate per epoch")


def loss_scale_svg(results: list[dict[str, Any]], replay: dict[str, Any] | None) -> str:
    """Two panels: log2 of each result's loss scale after every epoch, and the steps it skipped,
    over the replay's; empty without a loss scale."""
    scale = epoch_series_svg(results, replay, "loss_scale", "float64 replay", "loss scale after each epoch",
                             "log2 scale", "loss scale per epoch")
    skipped = epoch_series_svg(results, replay, "skipped", "float64 replay", "skipped steps per epoch",
                               "skipped", "skipped steps per epoch")
    return scale + skipped


def epoch_series_svg(results: list[dict[str, Any]], replay: dict[str, Any] | None, key: str, replay_label: str,
                     title: str, axis: str, aria: str) -> str:
    """One panel of a per-epoch series from each result's curve record (`key`), over the
    replay's (grey); empty when fewer than two lines have it."""
    lines: list[Series] = []
    if replay is not None and replay.get(key):
        lines.append(Series(replay_label, replay[key]["epoch"], replay[key]["value"], "#000000",
                            width=2.5, opacity=0.35))
    for index, result in enumerate(results):
        series = (result.get("curve") or {}).get(key)
        if series:
            lines.append(Series(f"{result['backend']}, {result['device']}", series["epoch"], series["value"],
                                COLORS[index % len(COLORS)], DASHES.get(result["backend"], OTHER_DASH)))
    if len(lines) < 2:
        return ""
    legend, legend_height = _legend(lines, HEIGHT)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT + legend_height:.0f}" '
            f'width="100%" style="max-width:{WIDTH}px" font-family="sans-serif" font-size="11" '
            f'role="img" aria-label="{aria}">'
            + _panel(lines, title, axis, 0, legend) + "</svg>")


def trajectory_svg(trajectories: list[dict[str, Any]]) -> str:
    """One panel: per epoch, each result's distance from the replay at the value nearest to
    leaving its band (solid), and that band (thin, same colour): the check fails where a
    solid line crosses its band."""
    lines: list[Series] = []
    for index, record in enumerate(trajectories):
        if not record.get("band_distance"):
            continue
        label, color = f"{record['backend']}, {record['device']}", COLORS[index % len(COLORS)]
        distance, band = record["band_distance"], record["band"]
        values = [None if v is None else max(v, DISTANCE_FLOOR) for v in distance["value"]]
        lines.append(Series(label, distance["epoch"], values, color, DASHES.get(record["backend"], OTHER_DASH)))
        lines.append(Series(f"{label}: band", band["epoch"], band["value"], color, "2 2", width=0.8, opacity=0.6))
    if not lines:
        return ""
    legend, legend_height = _legend(lines, HEIGHT)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT + legend_height:.0f}" '
            f'width="100%" style="max-width:{WIDTH}px" font-family="sans-serif" font-size="11" '
            f'role="img" aria-label="distance from the float64 replay per epoch, with the trajectory band">'
            + _panel(lines, "trajectory: distance from the replay and its band", "|value - replay|", 0, legend)
            + "</svg>")


def _panel(series: list[Series], title: str, ylabel: str, x_offset: int, legend: str) -> str:
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM
    parts = [f'<g transform="translate({x_offset},0)">', legend,
             f'<text x="{(LEFT + right) / 2}" y="16" text-anchor="middle" font-size="12">{escape(title)}</text>',
             f'<text x="{(LEFT + right) / 2}" y="{HEIGHT - 6}" text-anchor="middle">epoch</text>',
             f'<text transform="translate(14,{(TOP + bottom) / 2}) rotate(-90)" text-anchor="middle">'
             f'{escape(ylabel)}</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" fill="none" stroke="#444"/>']
    positive = [v for line in series for _, v in line.points if v is not None and v > 0 and math.isfinite(v)]
    epochs = [epoch for line in series for epoch, _ in line.points]
    if not positive:
        parts.append(f'<text x="{(LEFT + right) / 2}" y="{(TOP + bottom) / 2}" text-anchor="middle" fill="#666">'
                     f'nothing positive to show on a log scale</text></g>')
        return "".join(parts)
    low, high = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
    high = max(high, low + 1)
    first, last = min(epochs), max(max(epochs), min(epochs) + 1)

    def x(epoch: float) -> float:
        return LEFT + (epoch - first) / (last - first) * (right - LEFT)

    def y(value: float) -> float:
        return bottom - (math.log10(value) - low) / (high - low) * (bottom - TOP)

    for exponent in range(low, high + 1, max(1, math.ceil((high - low) / 8))):
        parts.append(_grid_line(LEFT, right, y(10.0 ** exponent), f"1e{exponent:+03d}", horizontal=True))
    for tick in _nice_ticks(first, last):
        parts.append(_grid_line(TOP, bottom, x(tick), f"{tick:g}", horizontal=False))
    for line in series:
        for segment in _segments(line.points):
            if len(segment) == 1:  # a one-epoch case, or a point between gaps: a dot, not an invisible line
                (epoch, value), = segment
                parts.append(f'<circle cx="{x(epoch):.1f}" cy="{y(value):.1f}" r="{1.5 + line.width}" '
                             f'fill="{line.color}" fill-opacity="{line.opacity}"/>')
                continue
            points = " ".join(f"{x(epoch):.1f},{y(value):.1f}" for epoch, value in segment)
            parts.append(f'<polyline points="{points}" fill="none" {line.stroke}/>')
    parts.append("</g>")
    return "".join(parts)


def _grid_line(start: float, stop: float, at: float, label: str, horizontal: bool) -> str:
    if horizontal:
        return (f'<line x1="{start}" x2="{stop}" y1="{at:.1f}" y2="{at:.1f}" stroke="#ddd"/>'
                f'<text x="{start - 4}" y="{at + 4:.1f}" text-anchor="end" font-size="10">{label}</text>')
    return (f'<line x1="{at:.1f}" x2="{at:.1f}" y1="{start}" y2="{stop}" stroke="#ddd"/>'
            f'<text x="{at:.1f}" y="{stop + 14}" text-anchor="middle" font-size="10">{label}</text>')


def _legend(series: list[Series], y_top: float) -> tuple[str, float]:
    """Every line's sample and name, in rows under the panel (never over a curve); and its height."""
    parts, x, y = [], float(LEFT), y_top + 10
    for line in series:
        width = 36 + 6.2 * len(line.label) + 14
        if x + width > WIDTH - RIGHT and x > LEFT:
            x, y = float(LEFT), y + 15
        parts.append(f'<line x1="{x:.1f}" x2="{x + 28:.1f}" y1="{y - 4}" y2="{y - 4}" {line.stroke}/>'
                     f'<text x="{x + 34:.1f}" y="{y}" font-size="10">{escape(line.label)}</text>')
        x += width
    return "".join(parts), y + 6 - y_top


def _segments(points: Iterable[tuple[int, float | None]]) -> list[list[tuple[int, float]]]:
    """Runs of plottable points (finite and positive): a gap wherever a value is missing."""
    segments: list[list[tuple[int, float]]] = [[]]
    for epoch, value in points:
        if value is not None and value > 0 and math.isfinite(value):
            segments[-1].append((epoch, value))
        elif segments[-1]:
            segments.append([])
    return [segment for segment in segments if segment]


def _nice_ticks(first: float, last: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) between first and last."""
    raw = (last - first) / target
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(multiple * power for multiple in (1, 2, 5, 10) if multiple * power >= raw)
    start = math.ceil(first / step) * step
    return [start + index * step for index in range(int((last - start) / step) + 1)]


FIT_SAMPLES = 200  # points along x at which each fitted model is evaluated


def fit_svg(data: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The picture of a one-feature case, as tutorials draw it: the data as points (area by
    sample weight), and the fitted line, polynomial or sigmoid of the reference and of every
    result, from each one's final parameters."""
    xs, ys = data["x"], data["y"]
    if not xs:
        return ""
    low, high = min(xs), max(xs)
    pad = (high - low) * 0.05 or 1.0
    grid = [low - pad + (high - low + 2 * pad) * k / (FIT_SAMPLES - 1) for k in range(FIT_SAMPLES)]
    lines: list[Series] = []
    reference = data.get("reference")
    if reference and all(v is not None for v in reference["params"]):
        lines.append(Series(reference["name"], grid, _model_values(data, reference["params"], grid), "#000000",
                            width=3.5, opacity=0.3))
    for index, result in enumerate(results):
        params = result.get("params") or []
        if params and all(v is not None for v in params):
            lines.append(Series(f"{result['backend']}, {result['device']}", grid, _model_values(data, params, grid),
                                COLORS[index % len(COLORS)], DASHES.get(result["backend"], OTHER_DASH)))
    finite_y = [y for y in ys if y is not None]
    y_low, y_high = (-0.05, 1.05) if data.get("sigmoid") else (min(finite_y), max(finite_y))
    y_pad = 0.0 if data.get("sigmoid") else (y_high - y_low) * 0.1 or 1.0
    y_low, y_high = y_low - y_pad, y_high + y_pad
    legend, legend_height = _legend(lines, HEIGHT)
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM

    def px(value: float) -> float:
        return LEFT + (value - grid[0]) / (grid[-1] - grid[0]) * (right - LEFT)

    def py(value: float) -> float:
        return bottom - (value - y_low) / (y_high - y_low) * (bottom - TOP)

    title = "the data and every fit (final parameters)"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT + legend_height:.0f}" '
             f'width="100%" style="max-width:{WIDTH}px" font-family="sans-serif" font-size="11" role="img" '
             f'aria-label="{title}">', legend,
             f'<text x="{(LEFT + right) / 2}" y="16" text-anchor="middle" font-size="12">{title}</text>',
             f'<text x="{(LEFT + right) / 2}" y="{HEIGHT - 6}" text-anchor="middle">x</text>',
             f'<text transform="translate(14,{(TOP + bottom) / 2}) rotate(-90)" text-anchor="middle">'
             f'{"p(y = 1)" if data.get("sigmoid") else "y"}</text>',
             f'<clipPath id="plotarea"><rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}"/>'
             f'</clipPath>',
             f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" fill="none" stroke="#444"/>']
    for tick in _nice_ticks(grid[0], grid[-1]):
        parts.append(_grid_line(TOP, bottom, px(tick), f"{tick:g}", horizontal=False))
    for tick in _nice_ticks(y_low, y_high, target=5):
        parts.append(_grid_line(LEFT, right, py(tick), f"{tick:g}", horizontal=True))
    weights = data.get("weights") or [1.0] * len(xs)
    largest = max(weights) or 1.0
    parts.append('<g clip-path="url(#plotarea)">')
    for x, y, weight in zip(xs, ys, weights):
        if x is not None and y is not None:
            radius = 3.0 * math.sqrt(weight / largest) if weight else 1.0
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{max(radius, 1.0):.1f}" fill="#555" '
                         f'fill-opacity="{0.6 if weight else 0.15}"/>')
    for line in lines:
        for segment in _runs(line.points):
            points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in segment)
            parts.append(f'<polyline points="{points}" fill="none" {line.stroke}/>')
    parts.append("</g></svg>")
    return "".join(parts)


def _model_values(data: dict[str, Any], params: list[float], grid: list[float]) -> list[float | None]:
    """The model's output along `grid`: sum_k w_k x^k (+ b), or the network's with hidden
    layers, through a sigmoid for `bce`."""
    if data.get("network"):
        return _network_values(data, params, grid)
    degree, has_bias = data.get("degree", 1), data.get("has_bias", True)
    weights, bias = params[:degree], (params[degree] if has_bias else 0.0)
    values: list[float | None] = []
    for x in grid:
        try:
            z = sum(w * x ** (k + 1) for k, w in enumerate(weights)) + bias
            values.append(1.0 / (1.0 + math.exp(-z)) if data.get("sigmoid") else z)
        except OverflowError:
            values.append(0.0 if data.get("sigmoid") and z < 0 else None)
    return values


def _network_values(data: dict[str, Any], params: list[float], grid: list[float]) -> list[float | None]:
    """The output of a model with hidden layers along `grid`: the features as it was trained
    on (x^1..x^degree, standardized when the case says so), through network.py's forward pass."""
    import numpy as np

    from conformance import network

    described = data["network"]
    x = np.asarray(grid, dtype=np.float64)[:, None] ** np.arange(1, data.get("degree", 1) + 1)
    if described.get("mean") is not None:
        x = (x - np.asarray(described["mean"])) / np.asarray(described["scale"])
    model = network.layers(described["features"], described["hidden"], data.get("has_bias", True))
    theta = np.asarray([np.nan if value is None else value for value in params], dtype=np.float64)
    if theta.size != sum(layer.size for layer in model):
        return [None] * len(grid)
    with np.errstate(all="ignore"):
        z = network.forward(theta, x, model)[0]
        values = 1.0 / (1.0 + np.exp(-z)) if data.get("sigmoid") else z
    return [float(value) if math.isfinite(value) else None for value in values]


def _runs(points: Iterable[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Runs of finite points (any sign, unlike the log-scale panels' `_segments`)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is not None and math.isfinite(y):
            runs[-1].append((x, y))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if len(run) > 1]
