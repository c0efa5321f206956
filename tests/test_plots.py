"""The hand-written SVG plots: well-formed, on a log axis, with gaps where values are missing."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

from conformance.report.plots import _nice_ticks, _segments, curves_svg

SVG = "{http://www.w3.org/2000/svg}"


def result(backend, losses, distances):
    epochs = list(range(1, len(losses) + 1))
    return {"backend": backend, "device": "cpu", "curve": {"loss": {"epoch": epochs, "value": losses}},
            "distance": {"epoch": epochs, "value": distances}}


def test_two_panels_with_every_series_in_the_legends():
    replay = {"loss": {"epoch": [1, 2, 3], "value": [1.0, 0.1, 0.01]}}
    svg = curves_svg([result("keras", [1.0, 0.1, 0.01], [0.0, 1e-9, 2e-8]),
                      result("<torch>", [1.0, 0.1, 0.01], [0.0, 0.0, 0.0])], replay)
    root = ElementTree.fromstring(svg)  # well-formed XML, labels escaped
    texts = [element.text for element in root.iter(f"{SVG}text")]
    assert texts.count("keras, cpu") == 2 and texts.count("<torch>, cpu") == 2 and "float64 replay" in texts
    # Decades on the log axis: the loss panel spans 1e-02..1e+00, the distance panel reaches the 1e-17 floor.
    assert {"1e-02", "1e-01", "1e+00", "1e-17"} <= set(texts)
    assert len(list(root.iter(f"{SVG}polyline"))) == 5  # replay + 2 losses + 2 distances


def test_missing_and_non_positive_values_leave_gaps():
    assert _segments([(1, 1.0), (2, None), (3, 2.0), (4, 3.0), (5, 0.0), (6, float("inf"))]) == [
        [(1, 1.0)], [(3, 2.0), (4, 3.0)]]


def test_a_panel_with_nothing_to_show_says_so():
    svg = curves_svg([result("torch", [None, None], [None, None])], None)
    assert svg.count("nothing positive to show on a log scale") == 2


def test_epoch_ticks_are_round_numbers():
    assert _nice_ticks(1, 500) == [100, 200, 300, 400, 500]
    assert _nice_ticks(1, 7) == [1, 2, 3, 4, 5, 6, 7]


def test_the_data_picture_draws_points_the_reference_and_each_fit():
    """A line (y = 2x + 1) and a sigmoid: the fitted curves go through the model's values, a
    zero-weight point is drawn faint, and a diverged result (None parameters) is left out."""
    from conformance.report.plots import fit_svg

    data = {"x": [0.0, 1.0, 2.0], "y": [1.0, 3.0, 5.0], "weights": [1.0, 0.0, 4.0], "degree": 1,
            "has_bias": True, "sigmoid": False, "reference": {"name": "exact least squares", "params": [2.0, 1.0]}}
    svg = fit_svg(data, [{"backend": "keras", "device": "cpu", "params": [2.0, 1.0]},
                         {"backend": "jax", "device": "cpu", "params": [None, None]}])
    root = ElementTree.fromstring(svg)
    circles = list(root.iter(f"{SVG}circle"))
    assert len(circles) == 3 and circles[1].get("fill-opacity") == "0.15"
    assert float(circles[2].get("r")) > float(circles[0].get("r"))  # area by weight
    texts = [element.text for element in root.iter(f"{SVG}text")]
    assert "exact least squares" in texts and "keras, cpu" in texts and "jax, cpu" not in texts
    assert len(list(root.iter(f"{SVG}polyline"))) == 2
    sigmoid = fit_svg(data | {"y": [0.0, 1.0, 1.0], "sigmoid": True, "reference": None},
                      [{"backend": "torch", "device": "cpu", "params": [50.0, -25.0]}])
    assert "p(y = 1)" in sigmoid and ElementTree.fromstring(sigmoid) is not None
