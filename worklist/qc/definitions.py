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

_NATIONAL_RAD = "放射影像专业医疗质量控制指标（2024年版） 国卫办医政函〔2024〕150号"
_NATIONAL_LAB = "临床检验专业医疗质量控制指标（2025年版）"
_ALLIANCE = "医联体内部指标 alliance indicator"


@dataclass(frozen=True, slots=True)
class Indicator:
    code: str
    family: Literal["turnaround", "imaging", "ecg", "lab", "alliance"]
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


INDICATORS: tuple[Indicator, ...] = (
    _tat("TAT-01", "到达→完整", "arrival → complete"),
    _tat("TAT-02", "完整→认领", "complete → claimed"),
    _tat("TAT-03", "认领→首份报告", "claimed → first report"),
    _tat("TAT-04", "初步报告→正式报告", "preliminary → final"),
    _tat("TAT-05", "正式报告→送达", "final → delivered"),
    _tat("TAT-06", "送达→确认", "delivered → acknowledged"),
    _tat("TAT-07", "到达→正式报告（全程）", "arrival → final (total)"),
    Indicator(
        code="SLA-01",
        family="turnaround",
        name_zh="报告时限达标率",
        name_en="SLA compliance",
        source=_ALLIANCE,
        kind="rate",
        direction="higher",
        target=95.0,
        warn_margin=5.0,
        unit="%",
        numerator_zh="截止时间前签发正式报告",
        numerator_en="final report signed by the due time",
        denominator_zh="已签发或已超时的检查",
        denominator_en="exams reported or past their due time",
    ),
    Indicator(
        code="RRC-02",
        family="imaging",
        name_zh="急诊放射影像检查报告2小时完成率",
        name_en="Emergency imaging reports within 2 hours",
        source=_NATIONAL_RAD,
        kind="rate",
        direction="higher",
        target=95.0,
        warn_margin=3.0,
        unit="%",
        numerator_zh="检查开始后120分钟内首次签发正式报告",
        numerator_en="first final report within 120 min of exam start",
        denominator_zh="急诊影像检查的正式报告",
        denominator_en="final reports of emergency imaging exams",
    ),
    Indicator(
        code="RCV-04",
        family="imaging",
        name_zh="放射影像危急值10分钟内通报完成率",
        name_en="Imaging critical values notified within 10 minutes",
        source=_NATIONAL_RAD,
        kind="rate",
        direction="higher",
        target=100.0,
        warn_margin=2.0,
        unit="%",
        numerator_zh="10分钟内临床复述确认",
        numerator_en="read back by the clinic within 10 min",
        denominator_zh="影像危急值",
        denominator_en="imaging critical values",
    ),
    Indicator(
        code="RWS-03",
        family="imaging",
        name_zh="放射影像报告书写规范率",
        name_en="Imaging report writing compliance",
        source=_NATIONAL_RAD,
        kind="rate",
        direction="higher",
        target=98.0,
        warn_margin=2.0,
        unit="%",
        numerator_zh="规范的报告（已签名、无模板占位、左右一致、必填项齐全）",
        numerator_en="compliant reports (signed, no placeholders, sides agree, fields present)",
        denominator_zh="签发的影像报告",
        denominator_en="signed imaging reports",
    ),
    Indicator(
        code="IQ-01",
        family="imaging",
        name_zh="甲片率",
        name_en="Grade-A film rate",
        source=_ALLIANCE,
        kind="rate",
        direction="higher",
        target=70.0,
        warn_margin=5.0,
        unit="%",
        numerator_zh="甲级片",
        numerator_en="graded A (甲)",
        denominator_zh="已评级的检查",
        denominator_en="graded exams",
    ),
    Indicator(
        code="IQ-02",
        family="imaging",
        name_zh="废片率",
        name_en="Reject rate",
        source=_ALLIANCE,
        kind="rate",
        direction="lower",
        target=2.0,
        warn_margin=1.0,
        unit="%",
        numerator_zh="废片",
        numerator_en="graded reject (废)",
        denominator_zh="已评级的检查",
        denominator_en="graded exams",
    ),
    Indicator(
        code="ECG-01",
        family="ecg",
        name_zh="急诊心电图时限内报告率",
        name_en="Emergency ECGs reported within target",
        source=_ALLIANCE,
        kind="rate",
        direction="higher",
        target=95.0,
        warn_margin=3.0,
        unit="%",
        numerator_zh="截止时间前签发正式报告",
        numerator_en="final report by the due time",
        denominator_zh="已报告的急诊心电图",
        denominator_en="reported emergency ECGs",
    ),
    Indicator(
        code="ECG-02",
        family="ecg",
        name_zh="心电图危急值10分钟内通报率",
        name_en="Critical ECGs notified within 10 minutes",
        source=_ALLIANCE,
        kind="rate",
        direction="higher",
        target=100.0,
        warn_margin=2.0,
        unit="%",
        numerator_zh="10分钟内临床复述确认",
        numerator_en="read back within 10 min",
        denominator_zh="心电图危急值",
        denominator_en="ECG critical values",
    ),
    Indicator(
        code="ECG-03",
        family="ecg",
        name_zh="不可测量心电图比例",
        name_en="ECGs flagged not measurable",
        source=_ALLIANCE,
        kind="rate",
        direction="lower",
        target=None,
        warn_margin=0.0,
        unit="%",
        unavailable="no ECG measurements are recorded yet",
    ),
    Indicator(
        code="ECG-04",
        family="ecg",
        name_zh="医师修改机器测量值比例",
        name_en="Reader edits of machine measurements",
        source=_ALLIANCE,
        kind="rate",
        direction="lower",
        target=None,
        warn_margin=0.0,
        unit="%",
        unavailable="no ECG measurements are recorded yet",
    ),
    Indicator(
        code="CL-12",
        family="lab",
        name_zh="检验总周转时间第90百分位数（采集→报告）",
        name_en="Lab total turnaround P90 (collection → report)",
        source=_NATIONAL_LAB,
        kind="duration",
        direction="lower",
        target=None,
        warn_margin=0.0,
        unit="min",
        unavailable="no specimen collection times are recorded yet",
    ),
    Indicator(
        code="LAB-01",
        family="lab",
        name_zh="实验室内周转时间（接收→报告）",
        name_en="In-lab turnaround (receipt → report)",
        source=_NATIONAL_LAB,
        kind="duration",
        direction="lower",
        target=None,
        warn_margin=0.0,
        unit="min",
        unavailable="no lab receipt times are recorded yet",
    ),
    Indicator(
        code="CL-14",
        family="lab",
        name_zh="检验危急值通报率",
        name_en="Lab critical values notified",
        source=_NATIONAL_LAB,
        kind="rate",
        direction="higher",
        target=100.0,
        warn_margin=2.0,
        unit="%",
        numerator_zh="已通报（临床复述确认）",
        numerator_en="notified (read back)",
        denominator_zh="检验危急值",
        denominator_en="lab critical values",
    ),
    Indicator(
        code="CL-15",
        family="lab",
        name_zh="检验危急值通报及时率",
        name_en="Lab critical values notified within target",
        source=_NATIONAL_LAB,
        kind="rate",
        direction="higher",
        target=100.0,
        warn_margin=2.0,
        unit="%",
        numerator_zh="10分钟内临床复述确认",
        numerator_en="read back within 10 min",
        denominator_zh="检验危急值",
        denominator_en="lab critical values",
    ),
    Indicator(
        code="LAB-02",
        family="lab",
        name_zh="自动审核通过率",
        name_en="Auto-verification pass rate",
        source=_ALLIANCE,
        kind="rate",
        direction="higher",
        target=None,
        warn_margin=0.0,
        unit="%",
        unavailable="no auto-verification results are recorded yet",
    ),
    Indicator(
        code="ALL-01",
        family="alliance",
        name_zh="远程诊断量",
        name_en="Remote diagnoses",
        source=_ALLIANCE,
        kind="count",
        direction="higher",
        target=None,
        warn_margin=0.0,
        unit="",
        numerator_zh="签发正式报告的检查",
        numerator_en="exams with a final report",
    ),
    Indicator(
        code="ALL-02",
        family="alliance",
        name_zh="基层检查由牵头医院诊断比例",
        name_en="Member-clinic exams read by the lead hospital",
        source=_ALLIANCE,
        kind="rate",
        direction="higher",
        target=None,
        warn_margin=0.0,
        unit="%",
        numerator_zh="已签发正式报告",
        numerator_en="with a final report",
        denominator_zh="成员机构送达的检查",
        denominator_en="exams received from member clinics",
    ),
    Indicator(
        code="ALL-03",
        family="alliance",
        name_zh="报告互认标识率",
        name_en="Reports carrying the recognition mark",
        source=_ALLIANCE,
        kind="rate",
        direction="higher",
        target=None,
        warn_margin=0.0,
        unit="%",
        numerator_zh="带互认标识",
        numerator_en="carrying the mark",
        denominator_zh="签发的报告",
        denominator_en="signed reports",
    ),
    Indicator(
        code="ALL-04",
        family="alliance",
        name_zh="互认结果查询次数",
        name_en="Recognised-result look-ups",
        source=_ALLIANCE,
        kind="count",
        direction="higher",
        target=None,
        warn_margin=0.0,
        unit="",
        numerator_zh="查询",
        numerator_en="look-ups",
    ),
    Indicator(
        code="ALL-05",
        family="alliance",
        name_zh="不予互认次数（按原因）",
        name_en="Recognition declines by reason",
        source=_ALLIANCE,
        kind="count",
        direction="lower",
        target=None,
        warn_margin=0.0,
        unit="",
        numerator_zh="不予互认",
        numerator_en="declines",
    ),
    Indicator(
        code="ALL-06",
        family="alliance",
        name_zh="重新检查申请（按机构和原因）",
        name_en="Re-scan requests by clinic and reason",
        source=_ALLIANCE,
        kind="count",
        direction="lower",
        target=None,
        warn_margin=0.0,
        unit="",
        numerator_zh="重新检查申请",
        numerator_en="re-scan requests",
    ),
)

_BY_CODE = {i.code: i for i in INDICATORS}


def indicator(code: str) -> Indicator | None:
    """The indicator ``code`` (case-insensitive), or None."""
    return _BY_CODE.get(code.upper())
