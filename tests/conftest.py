"""Session settings. Under pytest-xdist (``-n auto``) each worker process takes its share of torch's
intra-op threads: every worker would otherwise start as many threads as the machine has cores, and on
the 2-core CI machine two workers with two threads each took 2.4x the time of one worker per core."""

import os

import torch


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))
