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
    """Default findings / impression / recommendation text for one kind of exam.

    An empty ``modality`` or ``body_part`` matches any value.
    """

    code: str
    name_zh: str
    name_en: str
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

TEMPLATES: tuple[ReportTemplate, ...] = (
    ReportTemplate(
        code="CT_CHEST",
        name_zh="胸部CT",
        name_en="Chest CT",
        modality="CT",
        body_part="CHEST",
        findings=(
            "两肺纹理清晰，肺野内未见明确实质性病变。气管及主要支气管通畅。纵隔内未见肿大淋巴结。"
            "心脏大小形态未见异常。双侧胸腔未见积液。\n"
            "Lungs clear; airways patent; no mediastinal lymphadenopathy; heart normal in size; "
            "no pleural effusion."
        ),
        impression="胸部CT平扫未见明显异常。\nNo acute abnormality on non-contrast chest CT.",
        fields=(_NODULE, _NODULE_SIZE, _EFFUSION),
    ),
    ReportTemplate(
        code="CT_HEAD",
        name_zh="头颅CT",
        name_en="Head CT",
        modality="CT",
        body_part="HEAD",
        findings=(
            "脑实质内未见异常密度影，脑室系统大小形态正常，中线结构居中，颅骨未见骨折。\n"
            "No intracranial haemorrhage or mass; ventricles normal; midline preserved; "
            "no fracture."
        ),
        impression="头颅CT平扫未见明显异常。\nNo acute intracranial abnormality.",
        fields=(
            TemplateField("haemorrhage", "颅内出血", "Intracranial haemorrhage", "bool"),
            TemplateField("midline_shift_mm", "中线移位 (mm)", "Midline shift (mm)", "number"),
        ),
    ),
    ReportTemplate(
        code="DX_CHEST",
        name_zh="胸部X线",
        name_en="Chest radiograph",
        modality="DX",
        body_part="CHEST",
        findings=(
            "两肺野清晰，心影大小形态正常，双膈面光整，肋膈角锐利。\n"
            "Lungs clear; cardiac silhouette normal; diaphragms smooth; costophrenic angles "
            "sharp."
        ),
        impression="心肺膈未见明显异常。\nNo active cardiopulmonary disease.",
        fields=(_EFFUSION,),
    ),
    ReportTemplate(
        code="MR_HEAD",
        name_zh="头颅MR",
        name_en="Brain MRI",
        modality="MR",
        body_part="HEAD",
        findings=(
            "脑实质内未见异常信号，DWI未见弥散受限，脑室系统未见扩张，中线结构居中。\n"
            "No abnormal signal; no restricted diffusion; ventricles normal; midline preserved."
        ),
        impression="头颅MR平扫未见明显异常。\nUnremarkable brain MRI.",
        fields=(TemplateField("infarct", "急性梗死", "Acute infarct", "bool"),),
    ),
    ReportTemplate(
        code="US_ABDOMEN",
        name_zh="腹部超声",
        name_en="Abdominal ultrasound",
        modality="US",
        body_part="ABDOMEN",
        findings=(
            "肝脏大小形态正常，实质回声均匀；胆囊、胰腺、脾脏、双肾未见明显异常。\n"
            "Liver normal in size with homogeneous echotexture; gallbladder, pancreas, spleen "
            "and kidneys unremarkable."
        ),
        impression="腹部超声未见明显异常。\nUnremarkable abdominal ultrasound.",
        fields=(
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
    ReportTemplate(
        code="IMAGING_GENERAL",
        name_zh="通用影像报告",
        name_en="General imaging report",
        findings="",
        impression="",
    ),
)


def templates_for(*, modality: str = "", body_part: str = "") -> list[ReportTemplate]:
    """Templates that apply to an exam, the most specific first (the general one last)."""
    matching = [t for t in TEMPLATES if t.matches(modality, body_part)]
    return sorted(matching, key=lambda t: (not t.modality, not t.body_part))


def template_by_code(code: str) -> ReportTemplate | None:
    """The template with ``code``, or None."""
    return next((t for t in TEMPLATES if t.code == code), None)
