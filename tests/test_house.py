"""The shape of the code: floors as folders, imports only downwards, stages as peers.

    core -> config -> data -> models, registry -> training, evaluation, serving -> stages -> flows

A helper subpackage imports only from floors below it (and from itself); a stage (a module at
the top of tasks/) imports helpers and never another stage; nothing in tasks/ imports flows/.
"""

import ast
from pathlib import Path

from conftest import ROOT

FLOORS = [["core"], ["config"], ["data"], ["models", "registry"], ["training", "evaluation", "serving"]]
RANK = {pkg: n for n, floor in enumerate(FLOORS) for pkg in floor}
STAGE_RANK = len(FLOORS)
STAGES = {"format", "train", "merge", "evaluate", "handoff", "lineage", "unchanged", "gc"}
# Project imports inside functions, kept because they defer a heavy library the importing module
# needs only on that path (torch, transformers, mlflow, prefect), or a module run as a program.
DEFERRED = {
    ("flows/cli", "flows.sft")  # prefect's flow machinery; `sftflow validate` stays fast
}


def place(module: str) -> tuple[int, str]:
    """(floor, room) of a module name: tasks.<sub>.<x> is a helper, tasks.<x> a stage, flows.* the top."""
    parts = module.split(".")
    if parts[0] == "flows":
        return STAGE_RANK + 1, "flows"
    if len(parts) > 2 or parts[1] in RANK:
        return RANK[parts[1]], parts[1]
    return STAGE_RANK, parts[1]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, inside a function) for each project import of a file."""
    tree = ast.parse(path.read_text())
    nested = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
        for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] in ("tasks", "flows")
        ):
            names = (
                [node.module]
                if node.module not in ("tasks", "flows")
                else [f"{node.module}.{a.name}" for a in node.names]
            )
            found += [(n, id(node) in nested) for n in names]
        elif isinstance(node, ast.Import):
            found += [
                (a.name, id(node) in nested) for a in node.names if a.name.split(".")[0] in ("tasks", "flows")
            ]
    return [(m, inner) for m, inner in found if "." in m]


def code_files():
    for path in sorted([*(ROOT / "tasks").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]):
        if "metrics" not in path.parts:
            yield path


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def test_every_import_goes_down_a_floor_or_stays_in_its_room():
    offending = []
    for path in code_files():
        me = module_of(path)
        if me in ("tasks", "flows"):
            continue
        rank, room = place(me)
        for target, _ in imports(path):
            t_rank, t_room = place(target)
            if t_room == room and room != "flows" and rank != STAGE_RANK:
                continue  # modules of one subpackage work together
            if room == "flows" and t_room == "flows":
                continue
            if t_rank >= rank:
                offending.append(f"{me} imports {target} ({room} is not above {t_room})")
    assert not offending, "\n".join(offending)


def test_stages_sit_at_the_top_of_tasks_and_helpers_in_subpackages():
    top = {p.stem for p in (ROOT / "tasks").glob("*.py")} - {"__init__"}
    assert top == STAGES, top ^ STAGES
    subpackages = {p.parent.name for p in (ROOT / "tasks").glob("*/__init__.py")}
    assert subpackages == set(RANK), subpackages ^ set(RANK)


def test_imports_inside_functions_only_defer_a_heavy_library():
    offending = [
        f"{module_of(path)} imports {target} inside a function"
        for path in code_files()
        for target, inner in imports(path)
        if inner and (str(path.relative_to(ROOT).with_suffix("")), target) not in DEFERRED
    ]
    assert not offending, "\n".join(offending)


def test_the_flow_passes_each_stage_the_results_it_needs():
    """flows/sft.py is the table of contents: every stage after format takes earlier results."""
    source = (ROOT / "flows/sft.py").read_text()
    for line in (
        "start = lineage_task(cfg)",
        "data = format_task(cfg, run_id, start, keep=keep)",
        "trained = train_task(cfg, run_id, data, start, keep=keep)",
        "merged = merge_task(cfg, run_id, data, trained, keep=keep)",
        "server = serve_task(cfg, run_id, data, trained, merged)",
        "scores = evaluate_task(cfg, run_id, data, merged)",
        "bundle = handoff_task(cfg, run_id, data, trained, merged, scores, server)",
    ):
        assert line in source, line


SECTION_OF = {"mlflow_uri": "tracking", "registered_model": "tracking", "served_model_name": "serve"}
# what every stage may read without declaring it: the run's name and folder, and the scaffold's
# inputs (PipelineConfig.scope hands it the declared sections only)
UNDECLARED_OK = {"run_name", "output_dir", "scope", "tracking_target"}
WHOLE_CONFIG = {"pipeline_fingerprint"}  # helpers that hash every section


def stage_reads(path: Path) -> tuple[set[str], set[str]]:
    """(sections declared in SECTIONS, sections the module reads through ``cfg``)."""
    from tasks.config import SECTION_NAMES

    tree = ast.parse(path.read_text())
    declared: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SECTIONS" for t in node.targets):
            value = node.value
            declared = set(SECTION_NAMES) if isinstance(value, ast.Name) else set(ast.literal_eval(value))
    local = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "cfg":
            if node.attr in ("section_hash", "model_dump"):
                read |= set(SECTION_NAMES)
            elif node.attr not in UNDECLARED_OK:
                read.add(SECTION_OF.get(node.attr, node.attr))
        elif isinstance(node, ast.Call) and any(getattr(a, "id", "") == "cfg" for a in node.args):
            callee = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if callee in WHOLE_CONFIG:
                read |= set(SECTION_NAMES)
            elif callee not in local:
                read.add(f"the whole config, passed to {callee}()")
    return declared, read


def test_a_stage_reads_only_the_sections_it_declares():
    """A stage's SECTIONS are hashed into its manifest and logged as its MLflow params; helpers
    take sections, never the whole config, so what a stage reads shows in its own module."""
    offending = {}
    for name in sorted(STAGES):
        declared, read = stage_reads(ROOT / "tasks" / f"{name}.py")
        if undeclared := read - declared:
            offending[name] = sorted(undeclared)
    assert not offending, offending


def test_helpers_take_sections_not_the_whole_config():
    offending = []
    for path in code_files():
        parts = path.relative_to(ROOT).parts
        if parts[0] != "tasks" or len(parts) < 3 or parts[1] == "config":
            continue  # stages, flows and the config itself
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name not in WHOLE_CONFIG:
                for arg in node.args.args + node.args.kwonlyargs:
                    if arg.annotation is not None and "PipelineConfig" in ast.unparse(arg.annotation):
                        offending.append(f"{module_of(path)}.{node.name}({arg.arg}: PipelineConfig)")
    assert not offending, offending
