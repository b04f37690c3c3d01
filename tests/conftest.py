"""Shared test settings: headless plots, few threads (CI has 2 cores), no user cache pollution."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)
