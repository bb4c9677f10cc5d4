"""The tags a registry version carries, which later nights read back."""

SOURCES_TAG = "sftflow.sources"  # the version's training sources, as SourceConfig dicts
WEIGHTS_TAG = "sftflow.weights_uri"  # MLflow URI of the adapter (lora, qlora) or model (full) it trained
METHOD_TAG = "sftflow.method"
BASE_TAG = "sftflow.base_model"
