"""DICOMweb (PS3.18) for viewers (OHIF, Weasis) and clinics without DIMSE: QIDO-RS search,
WADO-RS retrieve (objects, metadata, frames, rendered images, bulk data) and STOW-RS store."""

from web.dicomweb.router import router

__all__ = ["router"]
