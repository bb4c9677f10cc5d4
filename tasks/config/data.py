"""``data``: where the records come from, how they are read, templated, masked and packed."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.config.base import Section

RecordFormat = Literal["auto", "alpaca", "messages", "sharegpt", "completion"]
KNOWN_COLUMNS = (
    "instruction",
    "input",
    "output",
    "system",
    "messages",
    "conversations",
    "prompt",
    "completion",
    "text",
    "tools",
)


def check_roles(v: dict[str, str] | None) -> dict[str, str] | None:
    for key, role in (v or {}).items():
        if role not in ("system", "user", "assistant", "tool", "function_call"):
            raise ValueError(
                f"{key!r} maps to {role!r}; roles map onto system, user, assistant, tool or function_call"
            )
    return v


def check_columns(v: dict[str, str] | None) -> dict[str, str] | None:
    for key in v or {}:
        if key not in KNOWN_COLUMNS:
            raise ValueError(f"unknown canonical column {key!r}; expected one of {sorted(KNOWN_COLUMNS)}")
    return v


class _RolesAndColumns(Section):
    """The role and column maps a source reads its records with (a source's own, or data's)."""

    @field_validator("roles", check_fields=False)
    @classmethod
    def _roles(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_roles(v)

    @field_validator("columns", check_fields=False)
    @classmethod
    def _columns(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_columns(v)


class SourceConfig(_RolesAndColumns):
    """One source of a data mix. Without weight, count or fraction, all of its records are used."""

    path: str | list[str] = Field(..., description="file(s), globs, a save_to_disk folder or a hub name")
    name: str | None = Field(None, description="how counts and errors name it (default: the path)")
    weight: float | None = Field(
        None,
        description="weighted sources share the mix in proportion, as many records as the scarcest allows",
    )
    count: int | None = Field(None, gt=0, description="exactly this many records (repeated if it has fewer)")
    fraction: float | None = Field(None, gt=0, le=1, description="this share of the source's own records")
    format: RecordFormat | None = Field(None, description="default: data.format")
    columns: dict[str, str] | None = Field(None, description="default: data.columns")
    roles: dict[str, str] | None = Field(None, description="default: data.roles")

    @property
    def label(self) -> str:
        return self.name or (self.path if isinstance(self.path, str) else ",".join(self.path))

    @model_validator(mode="after")
    def _one_amount(self) -> SourceConfig:
        given = [k for k in ("weight", "count", "fraction") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"source {self.label!r}: give one of weight, count or fraction, not {given}")
        if self.weight is not None and not self.weight > 0:
            raise ValueError(
                f"source {self.label!r}: weight {self.weight} must be > 0 (leave the source out instead)"
            )
        for item in [self.path] if isinstance(self.path, str) else self.path:
            if problem := source_problem(item):
                raise ValueError(f"source {self.label!r}: {problem}")
        return self


class DataConfig(_RolesAndColumns):
    path: str | list[str] | None = Field(
        None,
        description="JSON/JSONL/CSV/Parquet file(s), globs, a save_to_disk folder, "
        "or a hub dataset name (when the hub is reachable); or give sources",
    )
    sources: list[SourceConfig] = Field(
        default_factory=list, description="a weighted mix of sources, each with its own options"
    )
    replay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of the training records drawn from the champion's own training sources",
    )
    replay_sources: int = Field(
        30,
        ge=1,
        description="the most of the champion's sources a replay reads (its newest first); older ones age out",
    )
    eval_path: str | list[str] | None = Field(
        None, description="separate eval data; otherwise eval_fraction is split off"
    )
    format: RecordFormat = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="canonical name -> column in the file")
    roles: dict[str, str] = Field(
        default_factory=dict,
        description="sharegpt `from` value -> system/user/assistant/tool/function_call, added to the "
        "defaults (human, gpt, observation, function_call, ...)",
    )
    template: str = Field(
        "auto",
        description="auto (tokenizer chat template, else alpaca), alpaca, chatml, a family's official "
        "template (llama3, llama3.2, qwen2.5, qwen3, gemma2, gemma3, mistral, phi3), or a .jinja path; "
        "a template that writes today's date (llama3.2) gets the format day's date, pinned for every stage",
    )
    max_seq_len: int = Field(512, gt=0)
    packing: bool = True
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="split off for eval when there is no eval_path")
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    train_on_inputs: bool = False
    require_stop: bool = Field(
        True,
        description="refuse examples that fit whole yet never train the template's end-of-turn token "
        "(EOS for plain text): a model trained on them never learns to stop",
    )
    excess_length: Literal["drop", "truncate", "error"] = "drop"
    seed: int = 42
    num_proc: int | None = Field(
        None, gt=0, description="tokenizing processes (default: 1 below 20k records, else the CPUs)"
    )
    cache: bool = Field(True, description="reuse the output of an identical earlier format run")
    slice_column: str | None = Field(
        None, description="a column of the raw records naming each one's slice (e.g. Dolly's category)"
    )

    @field_validator("path", "eval_path")
    @classmethod
    def _sources(cls, v: str | list[str] | None) -> str | list[str] | None:
        for item in [v] if isinstance(v, str) else v or []:
            if problem := source_problem(item):
                raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _eval_split(self) -> DataConfig:
        if (self.path is None) == (not self.sources):
            raise ValueError("give data.path (one source) or data.sources (a mix), not both or neither")
        names = [s.label for s in self.sources]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"data.sources: the name(s) {dupes} are used twice; give each source a name")
        if not self.eval_path and self.eval_fraction == 0:
            raise ValueError(
                "eval_fraction must be > 0 when there is no eval_path (the eval set is split off)"
            )
        return self

    def mix(self) -> list[SourceConfig]:
        """The sources, each with the data-wide format, columns and roles where it sets none."""
        given = self.sources or [SourceConfig(path=self.path)]
        return [
            s.model_copy(
                update={
                    "format": s.format or self.format,
                    "columns": self.columns if s.columns is None else s.columns,
                    "roles": self.roles if s.roles is None else s.roles,
                }
            )
            for s in given
        ]


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".tsv")
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def source_problem(item: str) -> str | None:
    """Why a data source cannot be read, for what can be told without reading it."""
    if any(ch in item for ch in "*?["):
        return None if glob.glob(item, recursive=True) else f"the glob {item!r} matches no file"
    path = Path(item)
    if path.exists():
        return None
    if path.is_absolute() or item.startswith(("./", "../", "~")) or path.suffix.lower() in DATA_SUFFIXES:
        return f"{item} does not exist"
    if HUB_NAME.match(item) and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return (
            f"{item!r} is neither a local file nor folder, and as a hub dataset name it cannot be loaded: "
            "HF_HUB_OFFLINE is set"
        )
    if not HUB_NAME.match(item):
        return f"{item} does not exist (and is not a hub dataset name such as 'org/name')"
    return None
