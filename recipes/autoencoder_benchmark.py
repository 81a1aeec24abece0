"""Train the dynamic and the static autoencoder the same way and print their figures side by side.

    python recipes/autoencoder_benchmark.py                           # defaults of the recipe
    python recipes/autoencoder_benchmark.py --trainer.max_epochs=2    # any recipe argument

Every argument is passed to both ``recipes/autoencoder.py fit`` runs (same data, seed, schedule);
only ``--model.kind`` differs. The table and ``benchmark.json`` (beside the two runs' folders) hold PSNR/SSIM on held-out photographs, parameters, saved sizes and 512×512 CPU time.
"""

from __future__ import annotations

import json
import sys
from typing import Any

# `python recipes/autoencoder_benchmark.py` puts recipes/ first on sys.path.
from autoencoder import AutoencoderReport, report_table
from autoencoder import main as autoencoder_main
from rich.console import Console

KINDS = ("dynamic", "static")


def main(args: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Fit each kind with ``args`` and return ``{kind: figures}``."""
    args = sys.argv[1:] if args is None else list(args)
    reports: dict[str, dict[str, Any]] = {}
    log_dirs = []
    for kind in KINDS:
        cli = autoencoder_main(["fit", *args, f"--model.kind={kind}"])
        report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, AutoencoderReport))
        reports[kind] = report.figures
        log_dirs.append(report.out_dir)
    Console().print(report_table(reports, title="dynamic vs static autoencoder"))
    if cli.trainer.is_global_zero:
        path = log_dirs[0].parent / "benchmark.json"
        path.write_text(json.dumps(reports, indent=2))
        Console().print(f"benchmark.json → {path}")
    return reports


if __name__ == "__main__":
    main()
