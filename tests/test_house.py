"""The shape of the code: stages are peers that import only helpers, and helpers no stage."""

import ast
from pathlib import Path

from conftest import ROOT

STAGE_MODULES = {"format", "train", "train_worker", "merge", "evaluate", "handoff", "unchanged"}


def project_imports(path: Path) -> set[str]:
    """The tasks.* modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tasks"):
            names = [node.module] if node.module != "tasks" else [f"tasks.{a.name}" for a in node.names]
            found |= {n.split(".")[1] for n in names if "." in n}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tasks.")}
    return found


def test_no_stage_imports_another_stage_and_no_helper_imports_a_stage():
    offending = []
    for path in sorted((ROOT / "tasks").glob("*.py")):
        me = path.stem
        stages = project_imports(path) & STAGE_MODULES - {me}
        if me == "train":
            stages -= {"train_worker"}  # the train stage starts its own worker program (by module name)
        if stages:
            offending.append(f"{path.name} imports {sorted(stages)}")
    assert not offending, offending


def test_the_flow_passes_each_stage_the_results_it_needs():
    """flows/sft.py is the table of contents: every stage after format takes earlier results."""
    source = (ROOT / "flows/sft.py").read_text()
    for line in (
        "start = lineage_task(cfg)",
        "data = format_task(cfg, run_id, start)",
        "trained = train_task(cfg, run_id, data, start)",
        "merged = merge_task(cfg, run_id, data, trained)",
        "scores = evaluate_task(cfg, run_id, data, merged)",
        "bundle = handoff_task(cfg, run_id, data, trained, merged, scores)",
    ):
        assert line in source, line
