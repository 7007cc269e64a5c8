"""The printable report: an A4 PDF rendered with reportlab from the signed document.

The PDF prints what the canonical document says, nothing else, so the two artefacts of a
signature cannot disagree. The mutual-recognition mark (HR, scope, recognisable-until
date) is printed inside the examination-data section, never beside the conclusion:
recognition covers the data and images, not the reader's opinion.

Key images are DICOM frames; decoding them is the gateway's business, which this package
may not import. The application registers a renderer with
:func:`register_key_image_renderer`; without one, the key images are listed by reference.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

from rdc_core.errors import ConfigurationError
from rdc_core.settings import get_settings
from worklist.patients.national_id import shown_patient_id

__all__ = [
    "CJK_FONT_CANDIDATES",
    "KeyImage",
    "KeyImageRenderer",
    "key_image_renderer",
    "register_key_image_renderer",
    "render_report_pdf",
]

# TrueType outlines only: reportlab embeds TrueType, not the CFF outlines of Noto CJK OTFs.
CJK_FONT_CANDIDATES: tuple[tuple[str, int], ...] = (
    ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", 0),
    ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", 0),
    ("/usr/share/fonts/truetype/arphic/uming.ttc", 0),
    ("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf", 0),
    ("/usr/share/fonts/truetype/noto/NotoSansSC-Regular.ttf", 0),
)
log = logging.getLogger(__name__)

_FONT = "RDC-CJK"
_CID_FALLBACK = "STSong-Light"
_font_lock = threading.Lock()
_font_ready: list[str] = []

KeyImageRenderer = Callable[[str, int], bytes]
"""(storage key of the DICOM object, frame number from 1) -> PNG or JPEG bytes."""

_renderer: list[KeyImageRenderer | None] = [None]


def _patient_id(patient: dict[str, Any]) -> str:
    """The patient ID as printed: a national ID masked (the signed document keeps it)."""
    return shown_patient_id(patient.get("issuer"), str(patient.get("patient_id") or ""))


def register_key_image_renderer(renderer: KeyImageRenderer | None) -> None:
    """Install the function that turns a stored DICOM frame into an image for the PDF
    (``None`` removes it: key images are then printed as references)."""
    _renderer[0] = renderer


def key_image_renderer() -> KeyImageRenderer | None:
    """The registered key-image renderer, if any."""
    return _renderer[0]


class KeyImage:
    """A key image for the PDF: its reference and, when rendered, the image bytes."""

    __slots__ = ("frame", "image", "sop_instance_uid")

    def __init__(self, sop_instance_uid: str, frame: int, image: bytes | None) -> None:
        self.sop_instance_uid = sop_instance_uid
        self.frame = frame
        self.image = image


def _register_font() -> str:
    if _font_ready:
        return _font_ready[0]
    with _font_lock:
        if _font_ready:
            return _font_ready[0]
        from reportlab.pdfbase import pdfmetrics
        from reportlab.pdfbase.ttfonts import TTFont

        for path, index in CJK_FONT_CANDIDATES:
            if Path(path).is_file():
                pdfmetrics.registerFont(TTFont(_FONT, path, subfontIndex=index))
                _font_ready.append(_FONT)
                return _FONT
        missing = (
            "no CJK TrueType font for reports; install fonts-wqy-microhei "
            "(looked for " + ", ".join(p for p, _ in CJK_FONT_CANDIDATES) + ")"
        )
        if get_settings().env == "production":
            raise ConfigurationError(missing)
        # A first run on a bare machine (the quick start) still signs readable reports:
        # reportlab's built-in Adobe CID font, which PDF viewers supply instead of the file.
        from reportlab.pdfbase.cidfonts import UnicodeCIDFont

        log.warning("%s; using the non-embedded font %s", missing, _CID_FALLBACK)
        pdfmetrics.registerFont(UnicodeCIDFont(_CID_FALLBACK))
        _font_ready.append(_CID_FALLBACK)
        return _CID_FALLBACK


def _local(iso: str | None, zone: ZoneInfo, *, with_time: bool = True) -> str:
    if not iso:
        return "—"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if moment.tzinfo is None:
        return iso
    local = moment.astimezone(zone)
    return local.strftime("%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d")


def _birth(value: str | None) -> str:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or "—"


def _person_name(value: str | None) -> str:
    """A DICOM person name as people read it: ``Wang^Fang=王^芳`` -> ``王芳 / Wang Fang``
    (the ideographic group, then the alphabetic one), never the raw value."""
    from worklist.delivery.senders import person_name_groups

    by_kind = {g.representation: g.display for g in person_name_groups(value or "")}
    shown = [by_kind.get("ideographic"), by_kind.get("alphabetic")]
    names = [n for n in shown if n] or [by_kind.get("phonetic") or ""]
    return " / ".join(n for n in names if n) or "—"


def _age(birth: str | None, performed: str | None) -> str:
    """Age at the exam: ``45岁 / 45 y`` (months or days for infants), or ``—``."""
    if not (birth and len(birth) == 8 and birth.isdigit() and performed):
        return "—"
    try:
        born = datetime.strptime(birth, "%Y%m%d").date()
        on = datetime.fromisoformat(performed).date()
    except ValueError:
        return "—"
    if on < born:
        return "—"
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    if years >= 1:
        return f"{years}岁 / {years} y"
    months = (on.year - born.year) * 12 + on.month - born.month - (on.day < born.day)
    if months >= 1:
        return f"{months}月 / {months} mo"
    days = (on - born).days
    return f"{days}天 / {days} d"


_SEX = {"M": "男 M", "F": "女 F", "O": "其他 O"}
_LEVEL = {"resident": "住院医师", "attending": "主治医师", "chief": "主任医师"}
_BANNER = {
    "amended": "修订版 Amended",
    "corrected": "更正版 Corrected",
    "appended": "补充版 Appended",
}
_REPORT_KIND = {
    "imaging": "医学影像诊断报告 Imaging Report",
    "ecg": "心电图诊断报告 ECG Report",
    "lab": "检验报告 Laboratory Report",
}
_FINDINGS_HEADING = {"ecg": "心电图所见 Findings", "lab": "检验所见 Findings"}
_KIND = {"amended": "修订 Amended", "corrected": "更正 Corrected", "appended": "补充 Appended"}


def _text(value: Any) -> str:
    # User text goes into reportlab's mini-markup: escape it and keep its line breaks.
    return escape(str(value or "")).replace("\n", "<br/>")


def render_report_pdf(
    document: dict[str, Any],
    *,
    key_images: list[KeyImage],
    zone: ZoneInfo,
    notice: str | None,
    figures: Mapping[str, bytes] | None = None,
) -> bytes:
    """The A4 report of ``document`` (see ``service.build_document``) as PDF bytes.

    The document's discipline ``sections`` (:mod:`worklist.signing.sections`) are printed
    too: portrait ones after the examination data, each landscape one on its own A4
    landscape page at the end. ``figures`` maps a section key to its PNG; a figure whose
    bytes do not match the SHA-256 the document states is refused (ValueError)."""
    from reportlab.lib import colors
    from reportlab.lib.enums import TA_CENTER
    from reportlab.lib.pagesizes import A4, landscape
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.platypus import (
        BaseDocTemplate,
        Frame,
        Image,
        KeepTogether,
        NextPageTemplate,
        PageBreak,
        PageTemplate,
        Paragraph,
        Spacer,
        Table,
        TableStyle,
    )

    font = _register_font()
    base = ParagraphStyle("base", fontName=font, fontSize=9.5, leading=13, wordWrap="CJK")
    small = ParagraphStyle("small", parent=base, fontSize=8, leading=10.5, textColor="#444444")
    title = ParagraphStyle("title", parent=base, fontSize=15, leading=20, alignment=TA_CENTER)
    subtitle = ParagraphStyle("subtitle", parent=base, fontSize=11, leading=15, alignment=TA_CENTER)
    heading = ParagraphStyle(
        "heading", parent=base, fontSize=10.5, leading=15, spaceBefore=6, textColor="#1f3b63"
    )
    body = ParagraphStyle("body", parent=base, fontSize=10, leading=15)
    mark_style = ParagraphStyle("mark", parent=base, fontSize=10, leading=14, textColor="#0b6b2e")
    notice_style = ParagraphStyle(
        "notice", parent=base, fontSize=11, leading=15, textColor="#b00020", alignment=TA_CENTER
    )

    banner_style = ParagraphStyle(
        "banner", parent=base, fontSize=13, leading=17, textColor="#b00020"
    )

    def label(zh: str, en: str) -> str:
        return f'<font color="#555555">{zh} {en}:</font> '

    report = document.get("report", {})
    exam = document.get("exam", {})
    patient = document.get("patient", {})
    clinic = exam.get("clinic", {}) or {}
    issuer = document.get("issuer", {}) or {}
    recognition = document.get("recognition") or {}
    width = A4[0] - 36 * mm
    story: list[Any] = []

    story.append(Paragraph(_text(issuer.get("alliance")), title))
    centre = issuer.get("centre")
    story.append(
        Paragraph(
            (_text(centre) + " · " if centre else "")
            + _REPORT_KIND.get(str(exam.get("discipline") or ""), _REPORT_KIND["imaging"]),
            subtitle,
        )
    )
    story.append(Spacer(1, 3 * mm))
    amended = report.get("amendment") or {}
    if amended.get("kind"):
        # An amended version says so at the top, where a reader cannot miss it.
        replaced = int(report.get("version", 2) or 2) - 1
        kind = amended["kind"]
        banner = Table(
            [
                [
                    Paragraph(
                        _text(f"{_BANNER.get(kind, _BANNER['amended'])}")
                        + " · "
                        + _text(f"替代第 {replaced} 版 / replaces v{replaced}"),
                        banner_style,
                    )
                ],
                [Paragraph(label("原因", "Reason") + _text(amended.get("reason")), base)],
            ],
            colWidths=[width],
        )
        banner.setStyle(
            TableStyle(
                [
                    ("BOX", (0, 0), (-1, -1), 1.4, colors.HexColor("#b00020")),
                    ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#fff1f1")),
                    ("LEFTPADDING", (0, 0), (-1, -1), 6),
                    ("TOPPADDING", (0, 0), (-1, -1), 3),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 3),
                ]
            )
        )
        story.append(banner)
        story.append(Spacer(1, 3 * mm))
    if notice:
        story.append(Paragraph(_text(notice), notice_style))
        story.append(Spacer(1, 2 * mm))

    def grid(rows: list[list[str]], col: list[float]) -> Any:
        cells = [[Paragraph(c, base) for c in row] for row in rows]
        table = Table(cells, colWidths=[w * width for w in col])
        table.setStyle(
            TableStyle(
                [
                    ("VALIGN", (0, 0), (-1, -1), "TOP"),
                    ("LEFTPADDING", (0, 0), (-1, -1), 3),
                    ("RIGHTPADDING", (0, 0), (-1, -1), 3),
                    ("TOPPADDING", (0, 0), (-1, -1), 1.5),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
                ]
            )
        )
        return table

    story.append(
        grid(
            [
                [
                    label("送检机构", "Clinic")
                    + _text(f"{clinic.get('name', '')} ({clinic.get('code', '')})"),
                    label("报告编号", "Report No.")
                    + _text(
                        f"{report.get('number') or report.get('id', '')[:8]}"
                        f" · v{report.get('version', 1)}"
                    ),
                ],
                [
                    label("姓名", "Name") + _text(_person_name(patient.get("name"))),
                    label("患者编号", "Patient ID")
                    + _text(f"{_patient_id(patient)} ({patient.get('issuer', '')})"),
                ],
                [
                    label("性别", "Sex") + _text(_SEX.get(patient.get("sex") or "", "—")),
                    label("出生日期", "Birth date")
                    + _text(_birth(patient.get("birth_date")))
                    + " · "
                    + label("检查时年龄", "Age at exam")
                    + _text(_age(patient.get("birth_date"), exam.get("performed_at"))),
                ],
            ],
            [0.5, 0.5],
        )
    )
    story.append(Spacer(1, 2 * mm))

    # The examination-data section; the recognition mark belongs here and only here.
    data_rows = [
        [
            label("检查类型", "Modality") + _text(exam.get("modality")),
            label("检查部位", "Body part") + _text(exam.get("body_part") or "—"),
        ],
        [
            label("检查时间", "Performed") + _text(_local(exam.get("performed_at"), zone)),
            label("检查号", "Accession") + _text(exam.get("accession_number") or "—"),
        ],
        [
            label("检查项目", "Description") + _text(exam.get("description") or "—"),
            label("图像数", "Objects") + _text(len(document.get("objects") or [])),
        ],
        [
            # The referring clinician as a person reads the name (never the raw PN value).
            label("申请医生", "Referring") + _text(_person_name(exam.get("referring_physician"))),
            "",
        ],
        [
            label("图像质量", "Image quality")
            + _text(report.get("quality_grade") or "—")
            + (
                f" <font size=8>({_text(report.get('quality_reason'))})</font>"
                if report.get("quality_reason")
                else ""
            ),
            label("检查实例", "Study UID")
            + f"<font size=7>{_text(exam.get('study_instance_uid'))}</font>",
        ],
    ]
    lab = exam.get("discipline") == "lab"
    if lab:
        # No images: the order's identifiers and times; the results are the lab section.
        data_rows = [
            [
                label("检验项目", "Tests") + _text(exam.get("description") or "—"),
                label("检验单号", "Accession") + _text(exam.get("accession_number") or "—"),
            ],
            [
                label("采样时间", "Collected") + _text(_local(exam.get("performed_at"), zone)),
                label("检验申请", "Order")
                + f"<font size=7>{_text(exam.get('study_instance_uid') or exam.get('id'))}</font>",
            ],
        ]
    data_table = grid(data_rows, [0.5, 0.5])
    data_block: list[Any] = [
        Paragraph("检验资料 Order data" if lab else "检查资料 Examination data", heading),
        data_table,
    ]
    # Lab results are recognised test by test, each with its own window (互认时限): the
    # marks are the results table's 互认 column, not one mark for the order.
    if recognition.get("granted") and not lab:
        mark = recognition.get("mark") or "HR"
        scope = recognition.get("scope")
        until = recognition.get("recognizable_until") or recognition.get("valid_until")
        items = recognition.get("items") or []
        item_names = ", ".join(
            str(i.get("name") or i.get("code")) if isinstance(i, dict) else str(i) for i in items
        )
        text = (
            f'<font size=13 color="#0b6b2e">[{_text(mark)}]</font> '
            "检查资料互认 Examination data recognised"
            + (f" · 范围 Scope: {_text(scope)}" if scope else "")
            + (f" · 互认有效期至 Recognisable until: {_text(until)}" if until else "")
            + (f"<br/>互认项目 Items: {_text(item_names)}" if item_names else "")
        )
        mark_table = Table([[Paragraph(text, mark_style)]], colWidths=[width - 6])
        mark_table.setStyle(
            TableStyle(
                [
                    ("BOX", (0, 0), (-1, -1), 0.8, colors.HexColor("#0b6b2e")),
                    ("LEFTPADDING", (0, 0), (-1, -1), 4),
                ]
            )
        )
        data_block += [Spacer(1, 1.5 * mm), mark_table]
    outer = Table([[data_block]], colWidths=[width])
    outer.setStyle(
        TableStyle(
            [
                ("BOX", (0, 0), (-1, -1), 0.6, colors.HexColor("#8899aa")),
                ("LEFTPADDING", (0, 0), (-1, -1), 0),
                ("RIGHTPADDING", (0, 0), (-1, -1), 0),
            ]
        )
    )
    story.append(outer)

    sections = [s for s in document.get("sections") or [] if isinstance(s, dict)]
    figures = dict(figures or {})
    for section in sections:
        if not section.get("landscape"):
            story += _section_flowables(section, figures, width, 240 * mm, heading, base, small)
        else:
            story.append(
                Paragraph(
                    _text(section.get("title"))
                    + " · 见附页（横向） / on the landscape page that follows",
                    small,
                )
            )

    if key_images:
        story.append(Paragraph("关键图像 Key images", heading))
        cells: list[Any] = []
        side = min(55 * mm, width / max(1, min(3, len(key_images))) - 4 * mm)
        for ki in key_images:
            caption = Paragraph(
                f"<font size=6.5>{_text(ki.sop_instance_uid)} · 帧 frame {ki.frame}</font>", small
            )
            if ki.image is not None:
                img = Image(io.BytesIO(ki.image))
                scale = min(side / img.imageWidth, side / img.imageHeight)
                img.drawWidth, img.drawHeight = img.imageWidth * scale, img.imageHeight * scale
                cells.append([img, caption])
            else:
                cells.append([caption])
        rows = [cells[i : i + 3] for i in range(0, len(cells), 3)]
        rows[-1] += [""] * (3 - len(rows[-1]))
        story.append(Table(rows, colWidths=[width / 3] * 3))

    if lab:
        # The findings of a lab report are its results table; the impression is the
        # reviewer's comment on the order, printed when there is one.
        if report.get("impression"):
            story.append(Paragraph("审核意见 Reviewer's comment", heading))
            story.append(Paragraph(_text(report.get("impression")), body))
    else:
        story.append(
            Paragraph(
                _FINDINGS_HEADING.get(str(exam.get("discipline") or ""), "影像所见 Findings"),
                heading,
            )
        )
        story.append(Paragraph(_text(report.get("findings")) or "—", body))
        story.append(Paragraph("诊断意见 Impression", heading))
        story.append(Paragraph(_text(report.get("impression")) or "—", body))
    if report.get("recommendation"):
        story.append(Paragraph("建议 Recommendation", heading))
        story.append(Paragraph(_text(report.get("recommendation")), body))
    if report.get("critical"):
        story.append(Spacer(1, 2 * mm))
        story.append(
            Paragraph("危急值 Critical finding — 已通知送检机构 clinic notified", notice_style)
        )

    amendment = report.get("amendment") or {}
    story.append(Spacer(1, 4 * mm))
    version_line = label("版本", "Version") + _text(report.get("version", 1))
    if amendment.get("kind"):
        version_line += (
            " · "
            + _text(_KIND.get(amendment["kind"], amendment["kind"]))
            + " · "
            + label("原因", "Reason")
            + _text(amendment.get("reason"))
            + " · "
            + label("替代", "Supersedes")
            + _text(f"v{int(report.get('version', 2) or 2) - 1}")
        )
    author = document.get("author") or {}
    verifier = document.get("verifier") or {}
    signer = document.get("signer") or {}

    def person(p: dict[str, Any]) -> str:
        if not p:
            return "—"
        level = _LEVEL.get(p.get("level") or "", "")
        return _text(f"{p.get('name') or p.get('username')} {level}".strip())

    footer = [
        [
            label("报告医师", "Reported by") + person(author),
            label("审核医师", "Verified by") + person(verifier),
        ],
        [
            label("电子签名", "Signed by") + person(signer),
            label("签名时间", "Signed at")
            + _text(_local(document.get("signed_at"), zone))
            + f" ({zone.key})",
        ],
        [
            version_line,
            label("证书", "Certificate") + _text(signer.get("certificate_serial", "")[:16]),
        ],
    ]
    footer_table = grid(footer, [0.5, 0.5])
    footer_table.setStyle(TableStyle([("LINEABOVE", (0, 0), (-1, 0), 0.6, colors.grey)]))
    story.append(KeepTogether([footer_table]))
    story.append(Spacer(1, 3 * mm))
    story.append(
        Paragraph(
            "本报告经电子签名（PAdES），任何修改均可被检出；可用 rdc verify 或 "
            "/api/v1/verify 验证。互认标识仅适用于检查资料，不适用于诊断意见。 "
            "Digitally signed (PAdES): any change is detectable. The recognition mark covers "
            "the examination data, never the conclusion.",
            small,
        )
    )
    if notice:
        story.append(Spacer(1, 2 * mm))
        story.append(Paragraph(_text(notice), notice_style))

    wide = landscape(A4)
    wide_margin = 6 * mm
    wide_width = wide[0] - 2 * wide_margin
    wide_height = wide[1] - 2 * wide_margin
    for section in sections:
        if section.get("landscape"):
            story += [NextPageTemplate("landscape"), PageBreak()]
            story += _section_flowables(
                section,
                figures,
                wide_width,
                wide_height,
                heading,
                base,
                small,
                compact=True,
                context=" · ".join(
                    v
                    for v in (
                        _person_name(patient.get("name")),
                        _patient_id(patient),
                        _SEX.get(patient.get("sex") or "", ""),
                        _age(patient.get("birth_date"), exam.get("performed_at")),
                        _local(exam.get("performed_at"), zone),
                        str(report.get("number") or ""),
                    )
                    if v and v != "—"
                ),
            )

    buffer = io.BytesIO()
    doc = BaseDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=18 * mm,
        rightMargin=18 * mm,
        topMargin=15 * mm,
        bottomMargin=15 * mm,
        title=f"Report {report.get('id', '')} v{report.get('version', 1)}",
        author=str(signer.get("name") or signer.get("username") or ""),
        creator="RDC",
        invariant=1,
    )
    portrait_frame = Frame(doc.leftMargin, doc.bottomMargin, doc.width, doc.height, id="portrait")
    landscape_frame = Frame(
        wide_margin,
        wide_margin,
        wide_width,
        wide_height,
        id="landscape",
        leftPadding=0,
        rightPadding=0,
        topPadding=0,
        bottomPadding=0,
    )
    doc.addPageTemplates(
        [
            PageTemplate(id="portrait", frames=[portrait_frame], pagesize=A4),
            PageTemplate(id="landscape", frames=[landscape_frame], pagesize=wide),
        ]
    )
    doc.build(story)
    return buffer.getvalue()


def _section_flowables(
    section: dict[str, Any],
    figures: dict[str, bytes],
    width: float,
    height: float,
    heading: Any,
    base: Any,
    small: Any,
    *,
    compact: bool = False,
    context: str = "",
) -> list[Any]:
    """A discipline section (see :mod:`worklist.signing.sections`): heading, figure at its
    physical size when it fits (else scaled to fit beside the table and paragraphs), table,
    paragraphs."""
    import hashlib

    from reportlab.lib import colors
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.platypus import Image, Paragraph, Spacer, Table, TableStyle

    cell = ParagraphStyle("cell", parent=base, fontSize=8 if compact else 9, leading=10)
    line = ParagraphStyle("line", parent=base, fontSize=9 if compact else 10, leading=12.5)
    table_spec = section.get("table") or None
    paragraphs = [str(p) for p in section.get("paragraphs") or []]
    spec = section.get("figure") or None
    title = _text(section.get("title"))
    if context:
        title += f" <font size=9>· {_text(context)}</font>"
    if compact and spec and spec.get("caption"):
        # One line for heading and caption: a landscape page keeps its height for the figure.
        title += f' <font size=8 color="#444444">· {_text(spec.get("caption"))}</font>'
    out: list[Any] = [Paragraph(title, heading)]
    # What the figure must leave room for (heading, table rows, paragraph lines), in points.
    reserved = (heading.leading + heading.spaceBefore) + 2 * mm
    if table_spec:
        reserved += (len(table_spec.get("rows") or []) + 1) * 12.5 + 1 * mm
        if section.get("table_title") and not compact:
            reserved += small.leading
    reserved += len(paragraphs) * line.leading + (1.5 * mm if paragraphs else 0)
    if not compact and spec and spec.get("caption"):
        reserved += small.leading
    if spec:
        png = figures.get(str(section.get("key")))
        if png is None:
            out.append(Paragraph(_text(spec.get("caption") or "—"), small))
        else:
            if hashlib.sha256(png).hexdigest() != spec.get("sha256"):
                raise ValueError(f"section {section.get('key')}: figure does not match its hash")
            img = Image(io.BytesIO(png))
            w = float(spec.get("width_mm") or 0) * mm or width
            h = float(spec.get("height_mm") or 0) * mm or w * img.imageHeight / img.imageWidth
            scale = min(1.0, width / w, max(20 * mm, height - reserved) / h)
            img.drawWidth, img.drawHeight = w * scale, h * scale
            img.hAlign = "LEFT"
            out.append(img)
            caption = "" if compact else str(spec.get("caption") or "")
            if scale < 0.999:
                caption += f" (缩放 scaled {scale * 100:.0f}%)"
            if caption.strip():
                out.append(Paragraph(_text(caption.strip()), small))
    if table_spec:
        if section.get("table_title") and not compact:
            out.append(Paragraph(_text(section.get("table_title")), small))
        columns = [str(c) for c in table_spec.get("columns") or []]
        rows = [[str(c) for c in row] for row in table_spec.get("rows") or []]
        data = [[Paragraph(f"<b>{_text(c)}</b>", cell) for c in columns]] + [
            [Paragraph(_text(c), cell) for c in row] for row in rows
        ]
        first = 0.16 if len(columns) > 4 else 0.3
        rest = (1 - first) / max(1, len(columns) - 1)
        table = Table(
            data, colWidths=[width * first] + [width * rest] * (len(columns) - 1), repeatRows=1
        )
        table.setStyle(
            TableStyle(
                [
                    ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#8899aa")),
                    ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8eef5")),
                    ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                    ("TOPPADDING", (0, 0), (-1, -1), 1),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
                ]
            )
        )
        out += [Spacer(1, 1 * mm), table]
    if paragraphs:
        out.append(Spacer(1, 1.5 * mm))
        out += [Paragraph(_text(p), line) for p in paragraphs]
    return out
