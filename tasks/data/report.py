"""What the format stage shows a person: the token-length histogram and the summary table."""

from __future__ import annotations

from pathlib import Path

from tasks.core.results import FormatResult


def length_histogram(lengths, max_len: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=min(60, max(10, len(lengths) // 20)), color="#3b75af")
    ax.axvline(max_len, color="#c44", linestyle="--", label=f"max_seq_len {max_len}")
    ax.set(xlabel="tokens per example", ylabel="examples", title="Token lengths of accepted train records")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_markdown(result: FormatResult, stats: dict) -> str:
    rows = "\n".join(f"| {k} | {v:,} |" for k, v in result.counts.items())
    columns = ("records_in", "accepted", "quarantined", "duplicates", "too_long")
    sources = "\n".join(
        f"| `{name}` | " + " | ".join(str(c.get(k, 0)) for k in columns) + " |"
        for name, c in stats["per_source"].items()
    )
    fill = stats.get("real_token_fraction")
    return (
        f"# Format: `{result.run_id}`{' (from cache)' if result.cache_hit else ''}\n\n"
        f"| count | value |\n|---|---|\n{rows}\n| train rows | {stats['train_rows']:,} |\n"
        f"| real-token fraction | {f'{fill:.1%}' if fill else 'no packing'} |\n"
        f"| tokens p50 / p99 / max | {stats['length_p50']} / {stats['length_p99']} / {stats['length_max']} |\n\n"
        f"| source | records in | accepted | quarantined | duplicates | too long |\n|---|---|---|---|---|---|\n"
        f"{sources}\n"
    )
