"""Annotation inputs of ``annotate_join``: CSV row schemas and validation, reader agreement."""
