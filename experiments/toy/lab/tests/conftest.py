"""The lab's tests run in CI beside tests/ (pyproject's testpaths); testutil comes from tests/ (pythonpath)."""
import torch

# Tiny models gain nothing from threads, and threads contend with anything else running.
torch.set_num_threads(1)
