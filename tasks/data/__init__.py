"""Records, data mixes, the data plan, chat templates and masks, packing, the collator."""

from tasks.data.batching import IGNORE, Collator, TrainingCollator
from tasks.data.checks import check_bad_fraction, check_stops
from tasks.data.messages import BadRecord, openai_messages, split_conversation
from tasks.data.mixing import Share, left_out_and_repeats, planned_counts, recorded_source, select
from tasks.data.packing import bins, pack, with_positions
from tasks.data.plan import DataPlan, plan_data
from tasks.data.records import SHAREGPT_ROLES, detect_format, iter_source, read_records, to_messages
from tasks.data.report import length_histogram, summary_markdown
from tasks.data.templating import (
    CHATML_TEMPLATE,
    TOO_LONG,
    TRUNCATED,
    Renderer,
    chat_template,
    end_of_turn_id,
    named_templates,
    prompt_text,
    stop_token_ids,
    template_sha,
    tokenize_batch,
    tokenize_conversations,
)

__all__ = [
    "BadRecord",
    "bins",
    "check_bad_fraction",
    "check_stops",
    "named_templates",
    "CHATML_TEMPLATE",
    "Collator",
    "DataPlan",
    "IGNORE",
    "Renderer",
    "SHAREGPT_ROLES",
    "Share",
    "TOO_LONG",
    "TRUNCATED",
    "TrainingCollator",
    "chat_template",
    "detect_format",
    "end_of_turn_id",
    "iter_source",
    "left_out_and_repeats",
    "length_histogram",
    "openai_messages",
    "pack",
    "plan_data",
    "planned_counts",
    "prompt_text",
    "read_records",
    "recorded_source",
    "select",
    "split_conversation",
    "stop_token_ids",
    "summary_markdown",
    "template_sha",
    "to_messages",
    "tokenize_batch",
    "tokenize_conversations",
    "with_positions",
]
