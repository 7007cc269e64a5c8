"""The web UI's message catalogue (zh-CN and en) and the choice of language per request.

Every visible string of the pages and of their scripts comes from here; templates call
``t("key")`` and scripts receive the whole catalogue of the page's language as JSON. Both
languages must hold the same keys (a test checks it). ``{name}`` placeholders are filled by
:func:`translate` and by the scripts' ``RDC.t``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

__all__ = [
    "DEFAULT_LANG",
    "LANGS",
    "LANG_COOKIE",
    "MESSAGES",
    "catalogue",
    "pick_lang",
    "translate",
    "translator",
]

LANG_COOKIE = "lang"
DEFAULT_LANG = "zh-CN"
LANGS = ("zh-CN", "en")

# key -> (zh-CN, en)
_CATALOGUE: dict[str, tuple[str, str]] = {
    # shell
    "app.name": ("远程诊断中心", "Remote Diagnostic Centre"),
    "app.tagline": (
        "医联体远程影像、心电与检验诊断",
        "Remote imaging, ECG and lab reading for the medical alliance",
    ),
    "nav.worklist": ("工作列表", "Worklist"),
    "nav.clinic": ("检查与报告", "Exams and reports"),
    "nav.logout": ("退出", "Sign out"),
    "nav.help": ("快捷键 ?", "Shortcuts ?"),
    "lang.other": ("English", "中文"),
    "lang.other_title": ("Switch to English", "切换到中文"),
    "footer.tz": ("时间按 {tz} 显示", "Times shown in {tz}"),
    "role.technician": ("技师", "Technician"),
    "role.clinician": ("临床医生", "Clinician"),
    "role.reader": ("诊断医师", "Reader"),
    "role.senior_reader": ("上级医师", "Senior reader"),
    "role.qc": ("质控", "Quality control"),
    "role.admin": ("管理员", "Administrator"),
    "level.resident": ("住院医师", "Resident"),
    "level.attending": ("主治医师", "Attending"),
    "level.chief": ("主任医师", "Chief"),
    # login
    "login.title": ("登录", "Sign in"),
    "login.username": ("用户名", "Username"),
    "login.password": ("密码", "Password"),
    "login.submit": ("登录", "Sign in"),
    "login.failed": ("用户名或密码错误", "Wrong username or password"),
    "login.missing": ("请输入用户名和密码", "Enter your username and password"),
    "login.cross_site": ("请求来源无效，请重试", "The request came from another site; try again"),
    # vocabularies
    "priority.emergency": ("急诊", "Emergency"),
    "priority.urgent": ("加急", "Urgent"),
    "priority.routine": ("常规", "Routine"),
    "discipline.imaging": ("影像", "Imaging"),
    "discipline.ecg": ("心电", "ECG"),
    "discipline.lab": ("检验", "Lab"),
    "state.open": ("待领取", "Open"),
    "state.claimed": ("已领取", "Claimed"),
    "state.awaiting_verification": ("待审核", "Awaiting verification"),
    "state.overdue": ("超时", "Overdue"),
    "state.mine": ("我的", "Mine"),
    "state.done": ("已完成", "Done"),
    "state.cancelled": ("已取消", "Cancelled"),
    "exam_state.RECEIVING": ("接收中", "Receiving"),
    "exam_state.READY": ("待诊断", "Ready for reading"),
    "exam_state.CANCELLED": ("已取消", "Cancelled"),
    "exam_state.RESCAN_REQUESTED": ("已退回重扫", "Re-scan requested"),
    "exam_state.PRELIMINARY": ("初步报告待审核", "Preliminary, awaiting verification"),
    "exam_state.FINAL": ("已出正式报告", "Final report issued"),
    "report_status.none": ("未出报告", "No report"),
    "report_status.draft": ("草稿", "Draft"),
    "report_status.preliminary": ("初步报告", "Preliminary"),
    "report_status.final": ("正式报告", "Final"),
    "sex.M": ("男", "Male"),
    "sex.F": ("女", "Female"),
    "sex.O": ("其他", "Other"),
    "quality.甲": ("甲级", "Grade A (甲)"),
    "quality.乙": ("乙级", "Grade B (乙)"),
    "quality.丙": ("丙级", "Grade C (丙)"),
    "quality.废": ("废片", "Reject (废)"),
    "dur.days": ("{d}天 ", "{d}d "),
    "dur.overdue": ("超时 {t}", "overdue {t}"),
    "common.all": ("全部", "All"),
    "common.none": ("—", "—"),
    "common.yes": ("是", "Yes"),
    "common.no": ("否", "No"),
    "common.loading": ("加载中…", "Loading…"),
    "common.close": ("关闭", "Close"),
    "common.updated": ("更新于 {time}", "Updated {time}"),
    "common.refresh": ("刷新", "Refresh"),
    "err.failed": ("操作失败：{detail}", "Failed: {detail}"),
    "err.network": ("无法连接服务器，请稍后重试", "Cannot reach the server; try again"),
    "err.session": ("登录已过期，请重新登录", "Your session has ended; sign in again"),
    # worklist
    "wl.title": ("诊断工作列表", "Reading worklist"),
    "wl.filter.discipline": ("专业", "Discipline"),
    "wl.filter.modality": ("设备类型", "Modality"),
    "wl.filter.clinic": ("送检机构", "Clinic"),
    "wl.filter.clinic_placeholder": ("机构代码", "clinic code"),
    "wl.filter.priority": ("优先级", "Priority"),
    "wl.filter.state": ("状态", "State"),
    "wl.filter.mine": ("只看我的", "Mine only"),
    "wl.filter.reset": ("清除筛选", "Clear filters"),
    "wl.col.priority": ("优先级", "Priority"),
    "wl.col.remaining": ("剩余时间", "Time left"),
    "wl.col.due": ("截止时间", "Due"),
    "wl.col.patient": ("患者", "Patient"),
    "wl.col.clinic": ("送检机构", "Clinic"),
    "wl.col.exam": ("检查项目", "Exam"),
    "wl.col.modality": ("设备", "Modality"),
    "wl.col.state": ("状态", "State"),
    "wl.col.report": ("报告", "Report"),
    "wl.col.action": ("操作", "Action"),
    "wl.col.received": ("接收时间", "Received"),
    "wl.claim": ("领取", "Claim"),
    "wl.open": ("继续", "Continue"),
    "wl.verify": ("审核", "Verify"),
    "wl.view": ("查看", "View"),
    "wl.taken_by": ("已被 {user} 领取", "Taken by {user}"),
    "wl.claimed_by_me": ("我已领取", "Claimed by me"),
    "wl.empty": ("没有符合条件的检查", "No exams match these filters"),
    "wl.total": ("共 {n} 项", "{n} items"),
    "wl.next": ("领取下一个", "Claim next"),
    "wl.nothing_left": ("没有待领取的检查", "Nothing left to claim"),
    "wl.claim_failed": ("领取失败：{detail}", "Could not claim: {detail}"),
    # reading page: viewer
    "rd.title": ("阅片与报告", "Reading"),
    "rd.series": ("序列", "Series"),
    "rd.series_label": ("序列 {n}", "Series {n}"),
    "rd.frame_slider": ("帧", "Frame"),
    "rd.frames": ("{n} 帧", "{n} frames"),
    "rd.frame": ("帧 {i} / {n}", "Frame {i} / {n}"),
    "rd.window": ("窗宽 {w} 窗位 {c}", "W {w} L {c}"),
    "rd.window_default": ("默认窗", "Default window"),
    "rd.zoom": ("缩放 {z}%", "Zoom {z}%"),
    "rd.preset.default": ("默认", "Default"),
    "rd.preset.lung": ("肺窗", "Lung"),
    "rd.preset.mediastinum": ("纵隔窗", "Mediastinum"),
    "rd.preset.bone": ("骨窗", "Bone"),
    "rd.preset.brain": ("脑窗", "Brain"),
    "rd.tool.wl": ("调窗", "W/L"),
    "rd.tool.pan": ("平移", "Pan"),
    "rd.tool.wl_title": ("左键拖动调节窗宽窗位", "Left-drag changes window/level"),
    "rd.tool.pan_title": ("左键拖动平移图像", "Left-drag pans the image"),
    "rd.zoom_in": ("放大", "Zoom in"),
    "rd.zoom_out": ("缩小", "Zoom out"),
    "rd.reset": ("复位", "Reset"),
    "rd.cine_play": ("播放", "Play"),
    "rd.cine_pause": ("暂停", "Pause"),
    "rd.fps": ("帧/秒", "fps"),
    "rd.header": ("DICOM 头信息", "DICOM header"),
    "rd.header.tag": ("标签", "Tag"),
    "rd.header.name": ("名称", "Name"),
    "rd.header.vr": ("VR", "VR"),
    "rd.header.value": ("值", "Value"),
    "rd.header.failed": ("无法读取头信息：{detail}", "Cannot read the header: {detail}"),
    "rd.prior": ("既往检查", "Prior exams"),
    "rd.prior.choose": ("与既往检查对比…", "Compare with a prior…"),
    "rd.prior.none": ("无既往检查", "No prior exams"),
    "rd.prior.close": ("关闭对比", "Close comparison"),
    "rd.prior.label": ("既往：{date} {desc}", "Prior: {date} {desc}"),
    "rd.current": ("当前检查", "Current exam"),
    "rd.no_images": ("此检查没有可显示的图像", "This exam has no images to show"),
    "rd.image_error": ("图像加载失败", "The image failed to load"),
    # reading page: exam and lease
    "ex.patient": ("患者", "Patient"),
    "ex.patient_id": ("患者ID", "Patient ID"),
    "ex.sex": ("性别", "Sex"),
    "ex.birth": ("出生日期", "Birth date"),
    "ex.clinic": ("送检机构", "Clinic"),
    "ex.accession": ("检查号", "Accession"),
    "ex.performed": ("检查时间", "Performed"),
    "ex.received": ("接收时间", "Received"),
    "ex.description": ("检查项目", "Exam"),
    "ex.body_part": ("部位", "Body part"),
    "ex.state": ("检查状态", "Exam state"),
    "ls.mine": ("我已领取 · 租约至 {time}", "Claimed by me · lease until {time}"),
    "ls.taken": ("已被 {user} 领取，只读", "Taken by {user}; read-only"),
    "ls.lost": ("租约已失效，报告只读", "The lease was lost; the report is read-only"),
    "ls.readonly": ("只读", "Read-only"),
    "ls.submitted": ("报告已提交", "Report submitted"),
    "ls.release": ("释放", "Release"),
    "ls.released": ("已释放", "Released"),
    # reading page: report
    "rp.title": ("诊断报告", "Report"),
    "rp.template": ("报告模板", "Template"),
    "rp.template.none": ("（不使用模板）", "(no template)"),
    "rp.findings": ("检查所见", "Findings"),
    "rp.impression": ("诊断意见", "Impression"),
    "rp.recommendation": ("建议", "Recommendation"),
    "rp.structured": ("结构化项目", "Structured fields"),
    "rp.quality": ("图像质量", "Image quality"),
    "rp.quality_reason": ("质量评价理由", "Reason for the grade"),
    "rp.critical": ("危急值", "Critical finding"),
    "rp.critical_hint": ("需在 10 分钟内通知临床", "The clinic must be told within 10 minutes"),
    "rp.rescan": ("退回重扫", "Return for re-scan"),
    "rp.rescan_reason": ("重扫原因", "Reason for the re-scan"),
    "rp.rescan_confirm": (
        "确定将此检查退回送检机构重新检查？",
        "Return this exam to the clinic for a re-scan?",
    ),
    "rp.rescan_done": ("已退回送检机构重扫", "Returned to the clinic for a re-scan"),
    "rp.rescan_need_reason": ("请填写重扫原因", "Give a reason for the re-scan"),
    "rp.saved": ("已保存 {time}", "Saved {time}"),
    "rp.saving": ("保存中…", "Saving…"),
    "rp.unsaved": ("有未保存的修改", "Unsaved changes"),
    "rp.save_failed": ("保存失败：{detail}", "Saving failed: {detail}"),
    "rp.submit": ("提交签发", "Submit and sign"),
    "rp.submit_prelim": ("提交初步报告", "Submit preliminary"),
    "rp.need_text": (
        "请填写检查所见或诊断意见后再提交",
        "Write the findings or the impression before submitting",
    ),
    "rp.need_grade": (
        "请先评定图像质量（甲/乙/丙/废）",
        "Grade the image quality (甲/乙/丙/废) first",
    ),
    "rp.need_grade_reason": (
        "丙级或废片需要填写理由",
        "Grades 丙 and 废 need a reason",
    ),
    "rp.submitted": ("报告已提交：{status}", "Report submitted: {status}"),
    "rp.verify": ("审核签发", "Verify and sign"),
    "rp.verified": ("报告已审核签发", "The report is verified and final"),
    "rp.status": ("报告状态", "Status"),
    "rp.version": ("第 {n} 版", "version {n}"),
    "rp.author": ("报告医师", "Reported by"),
    "rp.verified_by": ("审核医师", "Verified by"),
    "rp.submitted_at": ("提交时间", "Submitted"),
    "rp.final_at": ("签发时间", "Signed"),
    "rp.locked": ("报告已签发，不可修改", "Signed report: read-only"),
    "rp.prelim_notice": ("以正式报告为准", "Subject to the final report"),
    "rp.none_yet": ("尚无报告", "No report yet"),
    "rp.back": ("返回列表", "Back to the list"),
    "rp.print": ("打印", "Print"),
    # shortcuts
    "help.title": ("键盘快捷键", "Keyboard shortcuts"),
    "help.next": ("领取并打开下一个检查", "Claim and open the next exam"),
    "help.submit": ("提交 / 签发报告", "Submit / sign the report"),
    "help.presets": (
        "窗预设：1 肺窗 · 2 纵隔窗 · 3 骨窗 · 4 脑窗",
        "Window presets: 1 lung · 2 mediastinum · 3 bone · 4 brain",
    ),
    "help.default": ("默认窗（DICOM 头中的窗宽窗位）", "Default window (from the DICOM header)"),
    "help.frames": ("上一帧 / 下一帧", "Previous / next frame"),
    "help.pages": ("前后翻 10 帧", "Back / forward 10 frames"),
    "help.cine": ("电影播放 / 暂停", "Play / pause cine"),
    "help.help": ("显示或关闭本帮助", "Show or hide this help"),
    "help.mouse": (
        "滚轮翻帧 · Ctrl+滚轮缩放 · 右键拖动调窗 · 中键拖动平移",
        "Wheel: frames · Ctrl+wheel: zoom · right-drag: window/level · middle-drag: pan",
    ),
    "help.typing": (
        "在文本框中输入时快捷键不生效（Ctrl+Enter 除外）",
        "Shortcuts are off while typing in a text field (except Ctrl+Enter)",
    ),
    # clinic view
    "cl.title": ("本机构检查与报告", "Our exams and reports"),
    "cl.view_report": ("查看报告", "View report"),
    "cl.pending": ("待出报告", "Awaiting report"),
    "cl.empty": ("暂无检查", "No exams yet"),
    "pg.prev": ("上一页", "Previous"),
    "pg.next": ("下一页", "Next"),
    "pg.range": ("第 {from}–{to} 项，共 {total} 项", "{from}–{to} of {total}"),
    # report view
    "rv.title": ("检查报告", "Exam report"),
}

MESSAGES: dict[str, dict[str, str]] = {
    lang: {key: pair[index] for key, pair in _CATALOGUE.items()} for index, lang in enumerate(LANGS)
}


def pick_lang(cookie_value: str | None) -> str:
    """The page language: the ``lang`` cookie when it names a supported language, else zh-CN."""
    return cookie_value if cookie_value in LANGS else DEFAULT_LANG


def translate(lang: str, key: str, /, **params: object) -> str:
    """The message ``key`` in ``lang`` with ``{name}`` placeholders filled.

    An unknown key comes back as the key itself, so a missing message is visible, not fatal.
    """
    text = MESSAGES.get(lang, MESSAGES[DEFAULT_LANG]).get(key, key)
    for name, value in params.items():
        text = text.replace("{" + name + "}", str(value))
    return text


def translator(lang: str) -> Callable[..., str]:
    """``t(key, **params)`` bound to ``lang``, for templates."""

    def t(key: str, /, **params: object) -> str:
        return translate(lang, key, **params)

    return t


def catalogue(lang: str) -> Mapping[str, str]:
    """All messages of ``lang`` (sent to the page's scripts)."""
    return MESSAGES.get(lang, MESSAGES[DEFAULT_LANG])
