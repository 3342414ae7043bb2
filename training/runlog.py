"""The run's logs: metrics.csv, TensorBoard events and a PNG of the curves (rank 0 only)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

log = logging.getLogger(__name__)

CSV_FIELDS = ("step", "epoch", "loss", "lr", "val_psnr_y", "elapsed_s")


class RunLog:
    """CSV + TensorBoard (rank 0 only). On resume, rows after the resumed step are dropped."""

    def __init__(self, out: Path, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        rows = []
        if start_step > 0 and self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is optional
            log.warning("tensorboard is not installed; writing metrics.csv only")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})
        if self.tb is not None:
            for k in ("loss", "lr", "val_psnr_y"):
                if row.get(k) not in (None, ""):
                    self.tb.add_scalar(f"train/{k}" if k != "val_psnr_y" else "val/psnr_y", row[k], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(csv_path: Path, png_path: Path, title: str = "") -> Path:
    """Loss (and validation PSNR-Y, when logged) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    loss = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"]]
    val = [(int(r["step"]), float(r["val_psnr_y"])) for r in rows if r["val_psnr_y"]]
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(11 if val else 6, 4), squeeze=False)
    ax = axes[0][0]
    if loss:
        ax.plot(*zip(*loss, strict=True), lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (L1)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if val:
        ax2 = axes[0][1]
        ax2.plot(*zip(*val, strict=True), marker="o")
        ax2.set_xlabel("step")
        ax2.set_ylabel("validation PSNR-Y (dB)")
        ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
