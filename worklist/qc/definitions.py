"""The catalogue of QC indicators: code, names, source, how a figure is read, default target.

Codes of national indicators follow DOMAIN.md §C (RRC-02, RWS-03, RCV-04 of the 2024
radiology set; CL-12/14/15 of the 2025 lab set); the others are the alliance's own
(prefix ``TAT-``, ``SLA-``, ``IQ-``, ``ECG-``, ``LAB-``, ``ALL-``). Their targets are defaults
that QC staff change (versioned, audited) in ``qc_targets``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["INDICATORS", "Indicator", "Kind", "indicator"]

# rate: numerator / denominator (percent); duration: P50/P90 of the cases' minutes;
# count: how many cases.
Kind = Literal["rate", "duration", "count"]
Direction = Literal["higher", "lower"]
Family = Literal["turnaround", "imaging", "ecg", "lab", "alliance"]

_NATIONAL_RAD = "放射影像专业医疗质量控制指标（2024年版） 国卫办医政函〔2024〕150号"
_NATIONAL_LAB = "临床检验专业医疗质量控制指标（2025年版）"
_ALLIANCE = "医联体内部指标 alliance indicator"


@dataclass(frozen=True, slots=True)
class Indicator:
    code: str
    family: Family
    name_zh: str
    name_en: str
    source: str
    kind: Kind
    direction: Direction
    target: float | None
    warn_margin: float
    unit: str  # "%", "min" or "" (a count)
    numerator_zh: str = ""
    numerator_en: str = ""
    denominator_zh: str = ""
    denominator_en: str = ""
    # The product holds no data of this kind yet (the figure is "no data", never zero).
    unavailable: str = ""


def _tat(code: str, zh: str, en: str, target: float | None = None) -> Indicator:
    return Indicator(
        code=code,
        family="turnaround",
        name_zh=f"周转时间：{zh}",
        name_en=f"Turnaround: {en}",
        source=_ALLIANCE,
        kind="duration",
        direction="lower",
        target=target,
        warn_margin=0.0 if target is None else round(target * 0.1, 1),
        unit="min",
        numerator_zh="有两个时间点的检查",
        numerator_en="exams with both times",
        denominator_zh="期间到达的检查",
        denominator_en="exams that arrived in the period",
    )


Names = tuple[str, str]  # (zh, en)


def _indicator(
    code: str,
    family: Family,
    name: Names,
    source: str,
    kind: Kind,
    direction: Direction,
    *,
    target: tuple[float | None, float] = (None, 0.0),
    numerator: Names = ("", ""),
    denominator: Names = ("", ""),
    why: str = "",
) -> Indicator:
    return Indicator(
        code=code,
        family=family,
        name_zh=name[0],
        name_en=name[1],
        source=source,
        kind=kind,
        direction=direction,
        target=target[0],
        warn_margin=target[1],
        unit={"rate": "%", "duration": "min", "count": ""}[kind],
        numerator_zh=numerator[0],
        numerator_en=numerator[1],
        denominator_zh=denominator[0],
        denominator_en=denominator[1],
        unavailable=why,
    )


def _rate(
    code: str,
    family: Family,
    name: Names,
    source: str,
    target: tuple[float | None, float],
    numerator: Names,
    denominator: Names,
    *,
    direction: Direction = "higher",
) -> Indicator:
    """A rate (%): ``target`` is (target, warning margin)."""
    return _indicator(
        code,
        family,
        name,
        source,
        "rate",
        direction,
        target=target,
        numerator=numerator,
        denominator=denominator,
    )


def _count(
    code: str, name: Names, numerator: Names, *, direction: Direction = "higher"
) -> Indicator:
    """An alliance count (no target)."""
    return _indicator(code, "alliance", name, _ALLIANCE, "count", direction, numerator=numerator)


def _no_data(
    code: str, family: Family, name: Names, source: str, kind: Kind, direction: Direction, why: str
) -> Indicator:
    """An indicator of data the product does not hold yet: "no data", never zero."""
    return _indicator(code, family, name, source, kind, direction, why=why)


INDICATORS: tuple[Indicator, ...] = (
    _tat("TAT-01", "到达→完整", "arrival → complete"),
    _tat("TAT-02", "完整→认领", "complete → claimed"),
    _tat("TAT-03", "认领→首份报告", "claimed → first report"),
    _tat("TAT-04", "初步报告→正式报告", "preliminary → final"),
    _tat("TAT-05", "正式报告→送达", "final → delivered"),
    _tat("TAT-06", "送达→确认", "delivered → acknowledged"),
    _tat("TAT-07", "到达→正式报告（全程）", "arrival → final (total)"),
    _rate(
        "SLA-01",
        "turnaround",
        ("报告时限达标率", "SLA compliance"),
        _ALLIANCE,
        (95.0, 5.0),
        ("截止时间前签发正式报告", "final report signed by the due time"),
        ("已签发或已超时的检查", "exams reported or past their due time"),
    ),
    _rate(
        "RRC-02",
        "imaging",
        ("急诊放射影像检查报告2小时完成率", "Emergency imaging reports within 2 hours"),
        _NATIONAL_RAD,
        (95.0, 3.0),
        ("检查开始后120分钟内首次签发正式报告", "first final report within 120 min of exam start"),
        ("急诊影像检查的正式报告", "final reports of emergency imaging exams"),
    ),
    _rate(
        "RCV-04",
        "imaging",
        ("放射影像危急值10分钟内通报完成率", "Imaging critical values notified within 10 minutes"),
        _NATIONAL_RAD,
        (100.0, 2.0),
        ("10分钟内临床复述确认", "read back by the clinic within 10 min"),
        ("影像危急值", "imaging critical values"),
    ),
    _rate(
        "RWS-03",
        "imaging",
        ("放射影像报告书写规范率", "Imaging report writing compliance"),
        _NATIONAL_RAD,
        (98.0, 2.0),
        (
            "规范的报告（已签名、无模板占位、左右一致、必填项齐全）",
            "compliant reports (signed, no placeholders, sides agree, fields present)",
        ),
        ("签发的影像报告", "signed imaging reports"),
    ),
    _rate(
        "IQ-01",
        "imaging",
        ("甲片率", "Grade-A film rate"),
        _ALLIANCE,
        (70.0, 5.0),
        ("甲级片", "graded A (甲)"),
        ("已评级的检查", "graded exams"),
    ),
    _rate(
        "IQ-02",
        "imaging",
        ("废片率", "Reject rate"),
        _ALLIANCE,
        (2.0, 1.0),
        ("废片", "graded reject (废)"),
        ("已评级的检查", "graded exams"),
        direction="lower",
    ),
    _rate(
        "ECG-01",
        "ecg",
        ("急诊心电图时限内报告率", "Emergency ECGs reported within target"),
        _ALLIANCE,
        (95.0, 3.0),
        ("截止时间前签发正式报告", "final report by the due time"),
        ("已报告的急诊心电图", "reported emergency ECGs"),
    ),
    _rate(
        "ECG-02",
        "ecg",
        ("心电图危急值10分钟内通报率", "Critical ECGs notified within 10 minutes"),
        _ALLIANCE,
        (100.0, 2.0),
        ("10分钟内临床复述确认", "read back within 10 min"),
        ("心电图危急值", "ECG critical values"),
    ),
    _no_data(
        "ECG-03",
        "ecg",
        ("不可测量心电图比例", "ECGs flagged not measurable"),
        _ALLIANCE,
        "rate",
        "lower",
        "no ECG measurements are recorded yet",
    ),
    _no_data(
        "ECG-04",
        "ecg",
        ("医师修改机器测量值比例", "Reader edits of machine measurements"),
        _ALLIANCE,
        "rate",
        "lower",
        "no ECG measurements are recorded yet",
    ),
    _no_data(
        "CL-12",
        "lab",
        (
            "检验总周转时间第90百分位数（采集→报告）",
            "Lab total turnaround P90 (collection → report)",
        ),
        _NATIONAL_LAB,
        "duration",
        "lower",
        "no specimen collection times are recorded yet",
    ),
    _no_data(
        "LAB-01",
        "lab",
        ("实验室内周转时间（接收→报告）", "In-lab turnaround (receipt → report)"),
        _NATIONAL_LAB,
        "duration",
        "lower",
        "no lab receipt times are recorded yet",
    ),
    _rate(
        "CL-14",
        "lab",
        ("检验危急值通报率", "Lab critical values notified"),
        _NATIONAL_LAB,
        (100.0, 2.0),
        ("已通报（临床复述确认）", "notified (read back)"),
        ("检验危急值", "lab critical values"),
    ),
    _rate(
        "CL-15",
        "lab",
        ("检验危急值通报及时率", "Lab critical values notified within target"),
        _NATIONAL_LAB,
        (100.0, 2.0),
        ("10分钟内临床复述确认", "read back within 10 min"),
        ("检验危急值", "lab critical values"),
    ),
    _no_data(
        "LAB-02",
        "lab",
        ("自动审核通过率", "Auto-verification pass rate"),
        _ALLIANCE,
        "rate",
        "higher",
        "no auto-verification results are recorded yet",
    ),
    _count(
        "ALL-01",
        ("远程诊断量", "Remote diagnoses"),
        ("签发正式报告的检查", "exams with a final report"),
    ),
    _rate(
        "ALL-02",
        "alliance",
        ("基层检查由牵头医院诊断比例", "Member-clinic exams read by the lead hospital"),
        _ALLIANCE,
        (None, 0.0),
        ("已签发正式报告", "with a final report"),
        ("成员机构送达的检查", "exams received from member clinics"),
    ),
    _rate(
        "ALL-03",
        "alliance",
        ("报告互认标识率", "Reports carrying the recognition mark"),
        _ALLIANCE,
        (None, 0.0),
        ("带互认标识", "carrying the mark"),
        ("签发的报告", "signed reports"),
    ),
    _count("ALL-04", ("互认结果查询次数", "Recognised-result look-ups"), ("查询", "look-ups")),
    _count(
        "ALL-05",
        ("不予互认次数（按原因）", "Recognition declines by reason"),
        ("不予互认", "declines"),
        direction="lower",
    ),
    _count(
        "ALL-06",
        ("重新检查申请（按机构和原因）", "Re-scan requests by clinic and reason"),
        ("重新检查申请", "re-scan requests"),
        direction="lower",
    ),
)

_BY_CODE = {i.code: i for i in INDICATORS}


def indicator(code: str) -> Indicator | None:
    """The indicator ``code`` (case-insensitive), or None."""
    return _BY_CODE.get(code.upper())
