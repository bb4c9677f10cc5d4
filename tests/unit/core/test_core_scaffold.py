"""The stage scaffold, the exceptions and the code hashes, on their own."""

import errno

import pytest

from tasks.config import load_config
from tasks.core import errors
from tasks.core.hashing import imports_hash
from tasks.core.results import MergeResult
from tasks.core.stage import open_stage

from conftest import ROOT


@pytest.mark.parametrize(
    "error, builtin",
    [
        (errors.InputError, ValueError),
        (errors.MissingError, FileNotFoundError),
        (errors.StageFailed, RuntimeError),
        (errors.Unreachable, ConnectionError),
        (errors.StageTimeout, TimeoutError),
        (errors.OutOfMemory, MemoryError),
        (errors.DiskFull, OSError),
    ],
)
def test_each_error_is_an_sftflow_error_and_the_builtin_it_stands_for(error, builtin):
    assert issubclass(error, errors.SftflowError) and issubclass(error, builtin)
    assert issubclass(errors.ConfigError, errors.SftflowError)


def tiny(tmp_path):
    return load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path}"])


def test_the_scaffold_hashes_and_logs_only_the_declared_sections(tmp_path):
    cfg = tiny(tmp_path)
    scope = cfg.scope(("model", "merge"))
    assert set(scope.sections) == {"model", "merge"}
    assert scope.config_hash == cfg.section_hash("model", "merge") != cfg.section_hash("model", "train")
    with open_stage(scope, "r1", "merge", log=lambda _: None) as stage:
        stage.finish(MergeResult(run_id="r1", model_path="m", max_logit_diff=0.0, top1_agreement=1.0))
    assert (tmp_path / "r1" / "merge" / "manifest.json").is_file()


def test_a_full_disk_inside_a_stage_names_the_stage_and_its_folder(tmp_path):
    scope = tiny(tmp_path).scope(("merge",))
    with (
        pytest.raises(
            errors.DiskFull,
            match=r"No space left on device: the merge stage could not write under .*r1/merge",
        ),
        open_stage(scope, "r1", "merge", log=lambda _: None),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")
    # other OS errors pass through unchanged
    with pytest.raises(PermissionError), open_stage(scope, "r1", "merge", log=lambda _: None):
        raise PermissionError(errno.EACCES, "denied")
    assert not (tmp_path / "r1" / "merge" / "manifest.json").exists()


def test_the_code_hash_follows_imports_into_packages(tmp_path):
    """A module's hash covers what it imports, a package's __init__ included, and nothing else."""
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("from pkg.sub.leaf import X\n")
    (tmp_path / "pkg" / "sub" / "leaf.py").write_text("X = 1\n")
    (tmp_path / "pkg" / "main.py").write_text("from pkg.sub import X\n")
    (tmp_path / "pkg" / "other.py").write_text("Y = 1\n")
    before = imports_hash("pkg.main", tmp_path)
    (tmp_path / "pkg" / "other.py").write_text("Y = 2\n")
    assert imports_hash("pkg.main", tmp_path) == before
    (tmp_path / "pkg" / "sub" / "leaf.py").write_text("X = 2\n")
    assert imports_hash("pkg.main", tmp_path) != before
