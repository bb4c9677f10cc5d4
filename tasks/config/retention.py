"""``retention``: what `sftflow gc` (and the flow, after each run) keeps of the runs, the registry and the caches."""

from __future__ import annotations

from pydantic import Field

from tasks.config.base import Section


class RetentionPolicy(Section):
    enabled: bool = Field(True, description="run the garbage collection after each pipeline run")
    keep_runs: int = Field(
        7, ge=1, description="the newest runs kept whole; the champion's and candidate's runs are always kept"
    )
    checkpoints: bool = Field(
        False, description="keep a finished run's training checkpoints (false: delete them)"
    )
    format_cache_days: float = Field(
        14, gt=0, description="format cache entries unused this long are deleted"
    )
    score_cache_days: float = Field(
        14, gt=0, description="score cache entries (eval.cache) unused this long are deleted"
    )
    min_age_hours: float = Field(
        1, ge=0, description="nothing younger is touched (a run in progress, a folder being written)"
    )
