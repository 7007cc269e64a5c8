"""Report templates per modality and body part: default text and the structured fields.

The templates ship with the product as data; a reader starts from one and edits freely.
Structured fields are stored in the report's ``structured`` object under their ``key``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["TEMPLATES", "ReportTemplate", "TemplateField", "template_by_code", "templates_for"]

FieldType = Literal["text", "select", "number", "bool"]


@dataclass(frozen=True, slots=True)
class TemplateField:
    """One structured field of a template."""

    key: str
    label_zh: str
    label_en: str
    type: FieldType = "text"
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReportTemplate:
    """Default findings / impression / recommendation text for one kind of exam, in one
    language (``lang``).

    An empty ``modality`` or ``body_part`` matches any value.
    """

    code: str
    name_zh: str
    name_en: str
    lang: Literal["zh", "en"] = "zh"  # the language of the report text it starts
    modality: str = ""
    body_part: str = ""
    findings: str = ""
    impression: str = ""
    recommendation: str = ""
    fields: tuple[TemplateField, ...] = field(default_factory=tuple)

    def matches(self, modality: str, body_part: str) -> bool:
        """Whether this template applies to an exam of ``modality`` and ``body_part``."""
        return (not self.modality or self.modality == modality.upper()) and (
            not self.body_part or self.body_part == body_part.upper()
        )

    def as_dict(self) -> dict[str, Any]:
        """The template as plain JSON-ready data."""
        return asdict(self)


_NODULE = TemplateField(
    "nodule", "肺结节", "Pulmonary nodule", "select", ("无 none", "实性 solid", "磨玻璃 GGO")
)
_NODULE_SIZE = TemplateField("nodule_size_mm", "结节大小 (mm)", "Nodule size (mm)", "number")
_EFFUSION = TemplateField("effusion", "胸腔积液", "Pleural effusion", "bool")


def _pair(
    code: str,
    name: tuple[str, str],
    modality: str,
    body_part: str,
    findings: tuple[str, str],
    impression: tuple[str, str],
    fields: tuple[TemplateField, ...] = (),
) -> tuple[ReportTemplate, ReportTemplate]:
    """The Chinese template (``code``) and the English one (``code_EN``): a report body is
    written in one language, the one the reader chooses, never both at once."""
    zh_name, en_name = name
    return (
        ReportTemplate(
            code=code,
            name_zh=f"{zh_name}（中文）",
            name_en=f"{en_name} (Chinese)",
            lang="zh",
            modality=modality,
            body_part=body_part,
            findings=findings[0],
            impression=impression[0],
            fields=fields,
        ),
        ReportTemplate(
            code=f"{code}_EN",
            name_zh=f"{zh_name}（英文）",
            name_en=f"{en_name} (English)",
            lang="en",
            modality=modality,
            body_part=body_part,
            findings=findings[1],
            impression=impression[1],
            fields=fields,
        ),
    )


TEMPLATES: tuple[ReportTemplate, ...] = (
    *_pair(
        "CT_CHEST",
        ("胸部CT", "Chest CT"),
        "CT",
        "CHEST",
        (
            "两肺纹理清晰，肺野内未见明确实质性病变。气管及主要支气管通畅。纵隔内未见肿大淋巴结。"
            "心脏大小形态未见异常。双侧胸腔未见积液。",
            "Lungs clear; airways patent; no mediastinal lymphadenopathy; heart normal in size; "
            "no pleural effusion.",
        ),
        ("胸部CT平扫未见明显异常。", "No acute abnormality on non-contrast chest CT."),
        (_NODULE, _NODULE_SIZE, _EFFUSION),
    ),
    *_pair(
        "CT_HEAD",
        ("头颅CT", "Head CT"),
        "CT",
        "HEAD",
        (
            "脑实质内未见异常密度影，脑室系统大小形态正常，中线结构居中，颅骨未见骨折。",
            "No intracranial haemorrhage or mass; ventricles normal; midline preserved; "
            "no fracture.",
        ),
        ("头颅CT平扫未见明显异常。", "No acute intracranial abnormality."),
        (
            TemplateField("haemorrhage", "颅内出血", "Intracranial haemorrhage", "bool"),
            TemplateField("midline_shift_mm", "中线移位 (mm)", "Midline shift (mm)", "number"),
        ),
    ),
    *_pair(
        "DX_CHEST",
        ("胸部X线", "Chest radiograph"),
        "DX",
        "CHEST",
        (
            "两肺野清晰，心影大小形态正常，双膈面光整，肋膈角锐利。",
            "Lungs clear; cardiac silhouette normal; diaphragms smooth; costophrenic angles sharp.",
        ),
        ("心肺膈未见明显异常。", "No active cardiopulmonary disease."),
        (_EFFUSION,),
    ),
    *_pair(
        "MR_HEAD",
        ("头颅MR", "Brain MRI"),
        "MR",
        "HEAD",
        (
            "脑实质内未见异常信号，DWI未见弥散受限，脑室系统未见扩张，中线结构居中。",
            "No abnormal signal; no restricted diffusion; ventricles normal; midline preserved.",
        ),
        ("头颅MR平扫未见明显异常。", "Unremarkable brain MRI."),
        (TemplateField("infarct", "急性梗死", "Acute infarct", "bool"),),
    ),
    *_pair(
        "US_ABDOMEN",
        ("腹部超声", "Abdominal ultrasound"),
        "US",
        "ABDOMEN",
        (
            "肝脏大小形态正常，实质回声均匀；胆囊、胰腺、脾脏、双肾未见明显异常。",
            "Liver normal in size with homogeneous echotexture; gallbladder, pancreas, spleen "
            "and kidneys unremarkable.",
        ),
        ("腹部超声未见明显异常。", "Unremarkable abdominal ultrasound."),
        (
            TemplateField("gallstones", "胆囊结石", "Gallstones", "bool"),
            TemplateField(
                "fatty_liver",
                "脂肪肝",
                "Fatty liver",
                "select",
                ("无 none", "轻度 mild", "中度 moderate", "重度 severe"),
            ),
        ),
    ),
    *_pair(
        "IMAGING_GENERAL", ("通用影像报告", "General imaging report"), "", "", ("", ""), ("", "")
    ),
)


def templates_for(*, modality: str = "", body_part: str = "") -> list[ReportTemplate]:
    """Templates that apply to an exam, the most specific first (the general one last)."""
    matching = [t for t in TEMPLATES if t.matches(modality, body_part)]
    return sorted(matching, key=lambda t: (not t.modality, not t.body_part))


def template_by_code(code: str) -> ReportTemplate | None:
    """The template with ``code``, or None."""
    return next((t for t in TEMPLATES if t.code == code), None)
