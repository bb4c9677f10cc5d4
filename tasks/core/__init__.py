"""The ground floor: paths, files, hashes, manifests, results, the stage scaffold, errors, MLflow tracking."""

from tasks.core.errors import (
    ConfigError,
    DiskFull,
    InputError,
    MissingError,
    OutOfMemory,
    SftflowError,
    StageFailed,
    StageTimeout,
    Unauthorized,
    Unreachable,
)
from tasks.core.faults import fault
from tasks.core.files import atomic_dir, copy_tree, read_json, read_jsonl, write_json
from tasks.core.hashing import code_version, file_sha256, hash_json, imports_hash, package_hash, tree_sha256
from tasks.core.manifest import Manifest, load_manifest, manifest_path
from tasks.core.paths import CODE_ROOT, STAGES, new_run_id, run_dir, sftflow_home, stage_dir
from tasks.core.quiet import quiet_libraries
from tasks.core.results import (
    EvalResult,
    FormatResult,
    HandoffResult,
    Lineage,
    MergeResult,
    TrainResult,
    Unchanged,
)
from tasks.core.stage import Stage, StageScope, kept_result, open_stage, prefect_markdown, stage_logger
from tasks.core.tracking import (
    StageRun,
    Tracker,
    TrackingTarget,
    check_reachable,
    http_get,
    mlflow_client,
    redact,
)

__all__ = [
    "CODE_ROOT",
    "ConfigError",
    "DiskFull",
    "EvalResult",
    "FormatResult",
    "HandoffResult",
    "InputError",
    "Lineage",
    "Manifest",
    "MergeResult",
    "MissingError",
    "OutOfMemory",
    "STAGES",
    "SftflowError",
    "Stage",
    "StageFailed",
    "StageRun",
    "StageScope",
    "StageTimeout",
    "Tracker",
    "TrackingTarget",
    "TrainResult",
    "Unauthorized",
    "Unchanged",
    "Unreachable",
    "atomic_dir",
    "check_reachable",
    "code_version",
    "copy_tree",
    "fault",
    "file_sha256",
    "hash_json",
    "http_get",
    "imports_hash",
    "kept_result",
    "load_manifest",
    "manifest_path",
    "mlflow_client",
    "new_run_id",
    "open_stage",
    "package_hash",
    "prefect_markdown",
    "quiet_libraries",
    "read_json",
    "read_jsonl",
    "redact",
    "run_dir",
    "sftflow_home",
    "stage_dir",
    "stage_logger",
    "tree_sha256",
    "write_json",
]
