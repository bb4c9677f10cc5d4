"""The MLflow model registry: versions and aliases, lineage, the nightly fingerprint."""

from tasks.registry.fingerprint import pipeline_fingerprint, registered_with
from tasks.registry.inputs import dataset_inputs
from tasks.registry.lineage import fetch_weights, find_lineage
from tasks.registry.tags import BASE_TAG, METHOD_TAG, SOURCES_TAG, WEIGHTS_TAG
from tasks.registry.versions import (
    alias_version,
    all_versions,
    download_bundle,
    promote,
    register_bundle,
    set_alias,
    version_for_run,
    versions_tagged,
)

__all__ = [
    "BASE_TAG",
    "METHOD_TAG",
    "SOURCES_TAG",
    "WEIGHTS_TAG",
    "alias_version",
    "all_versions",
    "dataset_inputs",
    "download_bundle",
    "fetch_weights",
    "find_lineage",
    "pipeline_fingerprint",
    "promote",
    "register_bundle",
    "registered_with",
    "set_alias",
    "version_for_run",
    "versions_tagged",
]
