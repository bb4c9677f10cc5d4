"""The tags a registry version carries, which later nights read back."""

SOURCES_TAG = "sftflow.sources"  # the version's training sources, as SourceConfig dicts
WEIGHTS_TAG = "sftflow.weights_uri"  # MLflow URI of the adapter (lora, qlora) or model (full) it trained
METHOD_TAG = "sftflow.method"
BASE_TAG = "sftflow.base_model"
GATE_TAG = "sftflow.gate_passed"  # the evaluate gate's verdict, written when the version is registered
PROMOTED_TAG = "sftflow.promoted"  # "True" once champion points at it (written after the alias moves)
REPLACED_TAG = "sftflow.replaced"  # the champion it replaced ("" for none): rollback's history
NOT_PROMOTED_TAG = "sftflow.not_promoted"  # why a version that passed its gate stayed candidate


def promotion_unfinished(tags: dict[str, str]) -> bool:
    """Passed its gate, but the run died before champion moved to it (and nothing refused it since)."""
    return tags.get(GATE_TAG) == "True" and tags.get(PROMOTED_TAG) != "True" and NOT_PROMOTED_TAG not in tags
