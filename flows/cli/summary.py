"""The run summary `sftflow run` prints: scores, intervals, slices, the verdict, where to look."""

from __future__ import annotations

from tasks.core.space import human
from tasks.evaluation.gate import shown


def print_summary(s: dict) -> None:
    if s.get("unchanged"):
        same = s["same_as"]
        print(
            f"\nUNCHANGED: same data, config and code as version {same['version']} (run {same['run_id']}); "
            "nothing retrained"
        )
        print(f"bundle:    {same['bundle']}")
        return
    names = list(s["scores"])
    metrics = list(s["scores"][names[0]])
    width = max(len(m) for m in metrics) + 2
    print("\n" + "metric".ljust(width) + "".join(n.rjust(12) for n in names))
    for m in metrics:
        print(m.ljust(width) + "".join(f"{s['scores'][n][m]:12.4f}" for n in names))
    if intervals := s.get("intervals"):
        print("\nimprovement of the candidate, paired-bootstrap interval (+ is better)")
        print("".ljust(width) + "".join(f"vs {ref}".rjust(30) for ref in intervals))
        for m in metrics:
            print(m.ljust(width) + "".join(shown(intervals[ref].get(m)).rjust(30) for ref in intervals))
    if slices := s.get("slices"):
        print(
            "\nper slice"
            + "samples".rjust(width + 3 - len("per slice"))
            + "".join(n.rjust(12) for n in names)
        )
        for label, row in slices.items():
            print(
                label[: width - 1].ljust(width) + f"{row['n']:>7}" + "".join(f"{row[n]:12.4f}" for n in names)
            )
    print(f"\n{'PROMOTED' if s['promoted'] else 'NOT PROMOTED'}: {s['gate']}")
    if s.get("started_from"):
        print(f"lineage:   continued from version {s['started_from']} (train.init_from: champion)")
    if p := s.get("parity"):
        print(
            f"parity:    vLLM served the bundle: template {p['template_match']:.0%}, answers agree "
            f"{round(p['agreement'] * p['prompts'])}/{p['prompts']}, finish {p['finish_reasons']}"
            + (
                f", tool calls parsed {p['tool_calls_parsed']}/{p['tool_calls']}"
                if p.get("tool_calls")
                else ""
            )
        )
    print(f"registry:  {s['registered_model']} version {s['version']} (aliases: {', '.join(s['aliases'])})")
    print(f"run dir:   {s['run_dir']}")
    if gc := s.get("gc"):
        freed = gc["used_before"] - gc["used_after"]
        print(
            f"disk:      {human(gc['used_after'])} used in output_dir, {human(freed)} freed "
            f"({len(gc['deleted'])} item(s) past the retention policy; `sftflow gc --dry-run` lists them)"
        )
    print(f"bundle:    {s['bundle']}\nserve:     {s['serve_script']}")
    ui = (
        s["mlflow_uri"]
        if s["mlflow_uri"].startswith("http")
        else f"mlflow ui --backend-store-uri {s['mlflow_uri']}"
    )
    print(f"MLflow:    {ui}  (run {s['mlflow_run_id']})")
