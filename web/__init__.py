"""The HTTP application (REST API; DICOMweb and UI later) and the ``rdc`` command line."""
