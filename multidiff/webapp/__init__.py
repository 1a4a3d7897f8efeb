"""The web page of ``multidiff serve`` (:mod:`multidiff.webapp.page`)."""
