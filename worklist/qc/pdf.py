"""The monthly QC report (月度质控报告) as an A4 PDF in Chinese and English: every indicator
of the month with its target and status, and 12-month trend charts with the target line,
drawn with reportlab's own graphics (no browser, no network)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worklist.qc.schemas import IndicatorOut
from worklist.signing.pdf import _register_font  # the CJK font the signed reports embed

if TYPE_CHECKING:  # reportlab is imported where a report is drawn, not by every process
    from reportlab.graphics.shapes import Drawing

__all__ = ["TrendSeries", "render_monthly_pdf"]

_STATUS = {
    "met": "达标 met",
    "warning": "预警 warning",
    "not_met": "未达标 not met",
    "no_target": "—",
    "no_data": "无数据 no data",
}


@dataclass(frozen=True, slots=True)
class TrendSeries:
    """One indicator's monthly values (None: no data that month) and its target."""

    code: str
    title: str
    months: list[str]
    values: list[float | None]
    target: float | None
    unit: str


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "无数据 no data"
    text = f"{value:.1f}" if unit in ("%", "min") else f"{value:.0f}"
    return f"{text} {unit}".strip()


def _chart(series: TrendSeries, font: str) -> Drawing:
    from reportlab.graphics.charts.lineplots import LinePlot
    from reportlab.graphics.shapes import Drawing, Line, String
    from reportlab.graphics.widgets.markers import makeMarker
    from reportlab.lib import colors
    from reportlab.lib.units import mm

    width, height = 170 * mm, 55 * mm
    drawing = Drawing(width, height)
    drawing.add(String(0, height - 10, f"{series.code} {series.title}", fontName=font, fontSize=9))
    points = [(i, v) for i, v in enumerate(series.values) if v is not None]
    plot = LinePlot()
    plot.x, plot.y, plot.width, plot.height = 30, 25, width - 45, height - 45
    ys = [v for _, v in points] + ([series.target] if series.target is not None else [])
    top = max(ys) if ys else 1.0
    plot.data = [points or [(0, 0)]]
    plot.lines[0].strokeColor = colors.HexColor("#1f5fa8")
    plot.lines[0].symbol = makeMarker("FilledCircle", size=3)
    plot.xValueAxis.valueMin, plot.xValueAxis.valueMax = -0.5, len(series.months) - 0.5
    plot.xValueAxis.valueSteps = list(range(len(series.months)))
    plot.xValueAxis.labelTextFormat = lambda i: (
        series.months[int(i)][2:] if 0 <= int(i) < len(series.months) else ""
    )
    plot.xValueAxis.labels.fontName = font
    plot.xValueAxis.labels.fontSize = 6
    plot.yValueAxis.valueMin = 0
    plot.yValueAxis.valueMax = (100.0 if series.unit == "%" and top <= 100 else top * 1.2) or 1.0
    plot.yValueAxis.labels.fontSize = 7
    drawing.add(plot)
    if series.target is not None:
        span = plot.yValueAxis.valueMax - plot.yValueAxis.valueMin
        y = plot.y + plot.height * (series.target - plot.yValueAxis.valueMin) / span
        drawing.add(
            Line(
                plot.x,
                y,
                plot.x + plot.width,
                y,
                strokeColor=colors.HexColor("#c0392b"),
                strokeDashArray=[3, 2],
            )
        )
        drawing.add(
            String(
                plot.x + plot.width - 60,
                y + 2,
                f"目标 target {series.target:g}{series.unit}",
                fontName=font,
                fontSize=6,
                fillColor=colors.HexColor("#c0392b"),
            )
        )
    if not points:
        drawing.add(String(width / 2 - 30, height / 2, "无数据 no data", fontName=font, fontSize=9))
    return drawing


def render_monthly_pdf(
    *,
    alliance: str,
    month: str,
    generated_at: str,
    indicators: Sequence[IndicatorOut],
    trends: Sequence[TrendSeries],
) -> bytes:
    """The report's bytes."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    font = _register_font()
    base = ParagraphStyle("base", fontName=font, fontSize=8, leading=10, wordWrap="CJK")
    title = ParagraphStyle("title", parent=base, fontSize=15, leading=20, alignment=1)
    heading = ParagraphStyle("heading", parent=base, fontSize=11, leading=15, spaceBefore=8)
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=15 * mm,
        rightMargin=15 * mm,
        topMargin=15 * mm,
        bottomMargin=15 * mm,
        title=f"QC report {month}",
        author=alliance,
    )
    story: list = [
        Paragraph(f"{alliance}", title),
        Paragraph(f"月度质控报告 Monthly QC report · {month}", title),
        Paragraph(f"生成时间 Generated {generated_at}", base),
        Spacer(1, 4 * mm),
        Paragraph("指标 Indicators", heading),
    ]
    rows: list[list] = [
        [
            Paragraph(h, base)
            for h in (
                "代码 Code",
                "指标 Indicator",
                "分子 Num.",
                "分母 Den.",
                "结果 Value",
                "目标 Target",
                "状态 Status",
                "环比 Change",
            )
        ]
    ]
    for ind in indicators:
        rows.append(
            [
                Paragraph(ind.code, base),
                Paragraph(f"{ind.name_zh}<br/>{ind.name_en}", base),
                Paragraph("—" if ind.numerator is None else str(ind.numerator), base),
                Paragraph("—" if ind.denominator is None else str(ind.denominator), base),
                Paragraph(_fmt(ind.value, ind.unit), base),
                Paragraph("—" if ind.target is None else f"{ind.target:g} {ind.unit}", base),
                Paragraph(_STATUS.get(ind.status, ind.status), base),
                Paragraph("—" if ind.change is None else f"{ind.change:+.1f}", base),
            ]
        )
    table = Table(
        rows,
        colWidths=[16 * mm, 62 * mm, 14 * mm, 14 * mm, 20 * mm, 18 * mm, 22 * mm, 14 * mm],
        repeatRows=1,
    )
    table.setStyle(
        TableStyle(
            [
                ("GRID", (0, 0), (-1, -1), 0.3, colors.grey),
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8eef7")),
                ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
            ]
        )
    )
    story += [table, Paragraph("近12个月趋势 12-month trends", heading)]
    for series in trends:
        story += [_chart(series, font), Spacer(1, 2 * mm)]
    doc.build(story)
    return buffer.getvalue()
