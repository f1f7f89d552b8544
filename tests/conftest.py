"""Shared pytest setup."""

import torch

# The unit tests use tiny models, for which intra-op threads cost more in synchronisation than they gain,
# and on a shared 2-core machine a second spinning thread can slow a test down tenfold.
torch.set_num_threads(1)
