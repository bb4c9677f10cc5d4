"""Raw data in, validated conversations out: every source file, every record shape.

``iter_source`` yields ``(line, record-or-BadRecord)`` for one source: the 1-based line of
a JSONL file, the 1-based record of a JSON array, or the 1-based row of a CSV, Parquet or
``save_to_disk`` dataset. ``to_messages`` turns one record of any shape into a conversation
(``tasks.data.messages``), or raises ``BadRecord`` with the reason it goes to quarantine.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson

from tasks.config import HUB_NAME, DataConfig
from tasks.core.errors import InputError, MissingError
from tasks.data.messages import (
    BadRecord,
    chat_turn,
    conversation,
    split_conversation,
    text_field,
    tools_field,
)

FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
CANONICAL_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    # tool calling as LLaMA-Factory writes it: a turn of calls as JSON, and what the tool returned
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
}
BAD_BYTES = re.compile("[\udc80-\udcff]")  # undecodable bytes, as surrogateescape keeps them


def resolve_sources(spec: str | list[str], field: str = "data.path") -> list[str]:
    """Files, globs, ``save_to_disk`` folders or hub names -> the ordered list of sources."""
    out: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        path = Path(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(p for p in glob.glob(item, recursive=True) if Path(p).suffix in FILE_TYPES)
            if not matches:
                raise MissingError(f"{field}: the glob {item!r} matches no {'/'.join(FILE_TYPES)} file")
            out += matches
        elif path.is_dir():
            if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
                raise InputError(
                    f"{field}: {item} is a folder but not a dataset saved with save_to_disk "
                    "(use a glob such as 'folder/*.jsonl' for a folder of files)"
                )
            out.append(item)
        elif path.is_file():
            if path.suffix not in FILE_TYPES:
                raise InputError(
                    f"{field}: {item}: unsupported file type {path.suffix!r} "
                    f"(expected one of {', '.join(FILE_TYPES)})"
                )
            out.append(item)
        elif HUB_NAME.match(item) and not path.suffix:
            out.append(f"hub:{item}")
        else:
            raise MissingError(f"{field}: {item} does not exist")
    return out


def loads(text: str):
    """orjson's speed (about 3x on the format stage's read), the standard library's error
    messages and leniency (NaN, huge integers) for whatever orjson refuses."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _jsonl(path: Path) -> Iterator[tuple[int, dict | BadRecord]]:
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            if i == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM is an encoding marker, not data
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, BadRecord(f"invalid UTF-8 at byte {e.start}")
                continue
            if not line.strip():
                continue
            try:
                rec = loads(line)
            except json.JSONDecodeError as e:
                yield i, BadRecord(f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            yield (
                i,
                rec
                if isinstance(rec, dict)
                else BadRecord(f"record is a {type(rec).__name__}, not an object"),
            )


def _json(path: Path) -> Iterator[tuple[int, dict | BadRecord]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path}:{e.lineno}: not a valid JSON file: {e.msg} at column {e.colno} "
            "(use JSONL to quarantine bad records one by one)"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise InputError(f'{path}: expected a JSON array of records (or {{"data": [...]}})')
    for i, rec in enumerate(data, 1):
        yield (
            i,
            rec if isinstance(rec, dict) else BadRecord(f"record is a {type(rec).__name__}, not an object"),
        )


def _csv(path: Path) -> Iterator[tuple[int, dict | BadRecord]]:
    csv.field_size_limit(sys.maxsize)
    try:
        # surrogateescape keeps a bad byte to one row (quarantined below) instead of failing the file
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise InputError(f"{path}: the CSV file has no header row")
            for i, row in enumerate(reader, 1):
                if None in row:
                    yield (
                        i,
                        BadRecord(
                            f"row has {len(reader.fieldnames) + len(row[None])} fields, "
                            f"the header has {len(reader.fieldnames)}"
                        ),
                    )
                elif all(v in ("", None) for v in row.values()):
                    continue
                elif bad := next((k for k, v in row.items() if BAD_BYTES.search(v)), None):
                    yield i, BadRecord(f"field {bad!r} has invalid UTF-8")
                else:
                    yield i, {k: v for k, v in row.items() if v is not None}
    except csv.Error as e:
        raise InputError(f"{path}: CSV error: {e}") from None


def _rows(batches) -> Iterator[tuple[int, dict | BadRecord]]:
    i = 0
    for batch in batches:
        for rec in batch:
            i += 1
            yield i, rec


def iter_source(source: str) -> Iterator[tuple[int, dict | BadRecord]]:
    if source.startswith("hub:"):
        from datasets import load_dataset

        try:
            ds = load_dataset(source[4:], split="train")
        except Exception as e:  # the hub or the name; either way the user must see the cause
            raise InputError(
                f"data.path: {source[4:]!r} is not a local file and could not be loaded from the "
                f"Hugging Face hub: {e}"
            ) from None
        yield from _rows([r] for r in ds)
        return
    path = Path(source)
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict: its "train" split
            if "train" not in ds:
                raise InputError(f"{path}: saved DatasetDict has no 'train' split (it has {list(ds)})")
            ds = ds["train"]
        yield from _rows([r] for r in ds)
    elif path.suffix == ".jsonl":
        yield from _jsonl(path)
    elif path.suffix == ".json":
        yield from _json(path)
    elif path.suffix == ".csv":
        yield from _csv(path)
    else:
        yield from _rows(_parquet_batches(path))


def _parquet_batches(path: Path) -> Iterator[list[dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a Parquet file ({e})") from None
    for batch in file.iter_batches(batch_size=1000):
        yield batch.to_pylist()


# ---------------------------------------------------------------- shapes


def detect_format(record: dict, columns: dict[str, str]) -> str:
    col = lambda name: columns.get(name, name)
    if col("messages") in record:
        return "messages"
    if col("conversations") in record:
        return "sharegpt"
    if col("instruction") in record or col("output") in record:
        return "alpaca"
    if col("prompt") in record or col("text") in record:
        return "completion"
    raise BadRecord(f"cannot tell the data format from the keys {sorted(record)[:8]}")


def _turns(record: dict, key: str) -> list:
    turns = record.get(key)
    if isinstance(turns, str):  # CSV and some Parquet exports keep the turns as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise BadRecord(f"field {key!r} is text that is not a JSON list of turns") from None
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"field {key!r} must be a non-empty list of turns")
    return turns


def to_messages(record: dict, shape: str, columns: dict[str, str], roles: dict[str, str]):
    """One record in any supported shape -> a conversation with >= 1 assistant turn: a list of
    turns, or turns and tools (``tasks.data.messages``). ``roles`` maps sharegpt ``from`` values
    onto system/user/assistant/tool."""
    col = lambda name: columns.get(name, name)
    if shape == "alpaca":
        instruction, extra = (
            text_field(record, col("instruction")),
            text_field(record, col("input"), required=False),
        )
        msgs = [
            {"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
            {"role": "assistant", "content": text_field(record, col("output"))},
        ]
        system = text_field(record, col("system"), required=False)
        return ([{"role": "system", "content": system}] if system.strip() else []) + msgs
    if shape == "completion":
        if col("prompt") not in record and col("text") in record:
            return [{"role": "text", "content": text_field(record, col("text"))}]
        return [
            {"role": "user", "content": text_field(record, col("prompt"))},
            {"role": "assistant", "content": text_field(record, col("completion"))},
        ]
    if shape == "messages":
        key, role_key, text_key, role_map = (
            col("messages"),
            "role",
            "content",
            {r: r for r in CANONICAL_ROLES},
        )
    else:
        key, role_key, text_key, role_map = col("conversations"), "from", "value", roles
    msgs = []
    for n, turn in enumerate(_turns(record, key)):
        if not isinstance(turn, dict):
            raise BadRecord(f"{key}[{n}] is not an object")
        role = turn.get(role_key)
        if role not in role_map:
            raise BadRecord(f"{key}[{n}].{role_key}: unknown role {role!r} (known: {sorted(role_map)})")
        msgs.append(chat_turn(turn, role_map[role], text_key, f"{key}[{n}]"))
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRecord("no assistant turn")
    system = text_field(record, col("system"), required=False) if shape == "sharegpt" else ""
    if system.strip() and msgs[0]["role"] != "system":  # LLaMA-Factory's ShareGPT `system` column
        msgs.insert(0, {"role": "system", "content": system})
    return conversation(msgs, tools_field(record, col("tools")))


# ---------------------------------------------------------------- every source into one Arrow file


def read_records(
    d: DataConfig,
    sources: list[tuple[str, str, int | None]],
    options: list,
    arrow_path: Path,
    quarantine_path: Path,
    log,
) -> tuple[Counter, dict, Counter]:
    """Stream every record of every source into an Arrow file of accepted, deduplicated
    conversations (conv, source, line, split); quarantine the rest with file, line and reason.
    ``sources``: (split, file, index into ``options``, the mix's SourceConfigs; None: data's own)."""
    import pyarrow as pa

    fields = [("conv", pa.string()), ("source", pa.int32()), ("line", pa.int64()), ("split", pa.int8())]
    schema = pa.schema(fields + [("slice", pa.string())] * bool(d.slice_column))
    counts = Counter(records_in=0, quarantined=0, duplicates=0)
    per_source: dict[str, Counter] = {}
    formats: Counter = Counter()
    seen: set[int] = set()
    batch: dict[str, list] = {k: [] for k in schema.names}
    t0 = time.monotonic()
    with (
        pa.OSFile(str(arrow_path), "wb") as sink,
        pa.ipc.new_stream(sink, schema) as writer,
        quarantine_path.open("w", encoding="utf-8") as quarantine,
    ):

        def flush():
            writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
            for v in batch.values():
                v.clear()

        for s, (split, source, share) in enumerate(sources):
            o = d if share is None else options[share]
            roles = {**SHAREGPT_ROLES, **o.roles}
            src = per_source.setdefault(source, Counter(records_in=0, quarantined=0, duplicates=0))
            for line, rec in iter_source(source):
                counts["records_in"] += 1
                src["records_in"] += 1
                try:
                    if isinstance(rec, BadRecord):
                        raise rec
                    shape = o.format if o.format != "auto" else detect_format(rec, o.columns)
                    msgs = to_messages(rec, shape, o.columns, roles)
                except BadRecord as e:
                    quarantine.write(
                        json.dumps({"source": source, "line": line, "reason": str(e)}, ensure_ascii=False)
                        + "\n"
                    )
                    counts["quarantined"] += 1
                    src["quarantined"] += 1
                    continue
                conv = orjson.dumps(msgs).decode()
                turns, tools = split_conversation(msgs)
                norm = orjson.dumps(
                    [[(m["role"], " ".join(m["content"].split()), m.get("tool_calls")) for m in turns], tools]
                )
                key = int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "little")
                if key in seen:
                    counts["duplicates"] += 1
                    src["duplicates"] += 1
                    continue
                seen.add(key)
                formats[shape] += 1
                label = rec.get(d.slice_column) if d.slice_column else None
                values = (conv, s, line, int(split == "eval"), None if label is None else str(label))
                for k, v in zip(schema.names, values):
                    batch[k].append(v)
                if len(batch["conv"]) >= 10_000:
                    flush()
                if counts["records_in"] % 200_000 == 0:
                    log(f"format: read {counts['records_in']:,} records ({time.monotonic() - t0:.0f}s)")
        flush()
    empty = [source for source, c in per_source.items() if not c["records_in"]]
    if len(empty) == len(per_source):  # an empty night's drop: nothing to train on, say so by name
        raise InputError(
            f"format: {', '.join(empty)}: no records (the file is empty, or holds only blank lines or a "
            "header): nothing to train on"
        )
    for source in empty:
        log(f"format: {source}: no records (empty, blank lines or a header only)")
    return counts, per_source, formats
