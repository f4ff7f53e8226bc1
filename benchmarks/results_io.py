"""Where a benchmark's figures go: one JSON object per run under benchmarks/results/, and a printed table."""
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"CPU: {platform.processor() or platform.machine()}"


def git_commit() -> str:
    """The commit measured: WDE_COMMIT when set (a copy of the tree without its .git, as on a lent GPU machine),
    else git's HEAD, marked -dirty when tracked files differ from it."""
    if os.environ.get("WDE_COMMIT"):
        return os.environ["WDE_COMMIT"]

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True, cwd=RESULTS_DIR.parent)
        return result.stdout.strip() if result.returncode == 0 else ""
    commit = git("rev-parse", "HEAD")
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        return "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_result(workload: str, device: str, wde: dict, peer: dict | None, peer_error: str | None = None,
                 **extra) -> Path:
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {"workload": workload, "device": device_name(device), "torch": torch.__version__,
              "date": now.isoformat(timespec="seconds"), "commit": git_commit(), "wde": wde, "peer": peer,
              **({"peer_error": peer_error} if peer_error else {}), **extra}
    RESULTS_DIR.mkdir(exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["device"]).strip("-").lower()[:40]
    path = RESULTS_DIR / f"{workload}-{slug}-{now:%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def print_table(title: str, metric: str, wde: float, peer: float | None) -> None:
    ratio = f"{wde / peer:.2f}x" if peer else "-"
    peer_text = f"{peer:,.1f}" if peer else "-"
    print(f"\n{title}\n{'':<14}{metric:>16}\n{'wde':<14}{wde:>16,.1f}\n{'transformers':<14}{peer_text:>16}\n"
          f"{'ratio':<14}{ratio:>16}")
