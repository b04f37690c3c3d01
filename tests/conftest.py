"""Shared test settings: headless plots, few threads (CI has 2 cores), no user cache pollution."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config):
    try:
        import torch
    except ImportError:  # the board-side venv of .ci/run (no workstation stack)
        return
    torch.set_num_threads(1)
