"""Session settings. pytest-xdist's workers share the machine's cores, so each of them, and every
process a test starts from one, computes on a single thread instead of oversubscribing them."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

    import torch

    torch.set_num_threads(1)
