"""Charts as self-contained SVG: well-formed, offline, the same bytes for the same data."""

from __future__ import annotations

from xml.etree import ElementTree

import pytest

from shoptune import charts

SVG = "{http://www.w3.org/2000/svg}"


def texts(svg: str) -> list[str]:
    return [element.text for element in ElementTree.fromstring(svg).iter(f"{SVG}text")]


def test_a_bar_chart_is_well_formed_svg_with_escaped_labels_and_values():
    svg = charts.bar_chart([("a <b> & c", 0.5), ("ranking", 1.0), ("zero", 0.0)], title="Scores & more")
    root = ElementTree.fromstring(svg)
    assert root.tag == f"{SVG}svg" and root.find(f"{SVG}title").text == "Scores & more"
    assert {"a <b> & c", "ranking", "0.5000", "1.0000", "0.0000"} <= set(texts(svg))
    widths = [float(r.get("width")) for r in root.iter(f"{SVG}rect") if r.get("fill") == charts.COLORS[0]]
    assert widths == [180.0, 360.0, 0.0]  # 0..1 over 360 px
    assert "<script" not in svg and "href" not in svg
    assert svg == charts.bar_chart([("a <b> & c", 0.5), ("ranking", 1.0), ("zero", 0.0)], title="Scores & more")


def test_a_bar_chart_refuses_what_it_cannot_draw():
    with pytest.raises(ValueError):
        charts.bar_chart([], title="x")
    with pytest.raises(ValueError):
        charts.bar_chart([("nan", float("nan"))], title="x")


def test_a_line_chart_from_a_loss_csv(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,loss,val_loss\n1,11.9,\n2,11.7,11.8\n3,11.6,\n4,nan,\n")
    series = charts.series_from_csv(path, "step", ["loss", "val_loss"])
    assert series == {
        "loss": [(1, 11.9), (2, 11.7), (3, 11.6), (4, pytest.approx(float("nan"), nan_ok=True))],
        "val_loss": [(2, 11.8)],
    }
    svg = charts.line_chart(series, title="Training loss", x_label="step", y_label="loss")
    root = ElementTree.fromstring(svg)
    (line,) = root.iter(f"{SVG}polyline")
    assert len(line.get("points").split()) == 3  # the NaN step left out
    assert {"step", "loss", "val_loss"} <= set(texts(svg))  # axis labels and a legend for two series
    with pytest.raises(ValueError, match="no column"):
        charts.series_from_csv(path, "step", ["accuracy"])


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0, 1, [0, 0.2, 0.4, 0.6, 0.8, 1]),
        (1, 208, [0, 50, 100, 150, 200, 250]),
        (11.6, 11.9, [11.6, 11.7, 11.8, 11.9]),
        (5, 5, [4.5, 4.75, 5, 5.25, 5.5]),
    ],
)
def test_ticks_are_round_numbers_covering_the_range(low, high, expected):
    assert charts.nice_ticks(low, high) == pytest.approx(expected)


def test_whole_steps_on_a_step_axis_and_a_single_point():
    assert charts.nice_ticks(1, 12, count=6, whole=True) == [0, 2, 4, 6, 8, 10, 12]
    assert charts.nice_ticks(1, 1, count=6, whole=True) == [0, 1, 2]
    svg = charts.line_chart({"loss": [(1, 2.5)]}, title="one step")
    assert ElementTree.fromstring(svg).find(f"{SVG}rect") is not None
