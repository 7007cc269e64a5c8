"""The web UI: server-rendered pages (Jinja2) in zh-CN and en, with plain scripts that call
the JSON API. ``router`` holds the page routes; ``STATIC_DIR`` is mounted at ``/static``."""

from web.ui.lab import router as lab_router
from web.ui.pages import STATIC_DIR, TEMPLATE_DIR, router
from web.ui.portal import router as portal_router

router.include_router(portal_router)
router.include_router(lab_router)

__all__ = ["STATIC_DIR", "TEMPLATE_DIR", "router"]
