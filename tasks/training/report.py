"""What the train stage draws: the loss curve, with eval losses when they were taken."""

from __future__ import annotations

from pathlib import Path


def loss_curve(losses: list[float], eval_losses: list, every: int, path: Path) -> None:
    """Training loss per logged step, and eval loss at the steps it was measured (step 0 too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([every * (i + 1) for i in range(len(losses))], losses, label="training loss")
    if eval_losses:
        steps, values = zip(*eval_losses)
        ax.plot(steps, values, "o-", color="#e08a3c", label="eval loss")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
