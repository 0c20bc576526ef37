"""Test session settings: one intra-op thread per process.

The suite runs on small tensors, where thread start-up costs more than it saves, and on shared 2-core
machines, where two busy processes each asking for 2 threads run 10× slower (measured 2026-11-23).
"""
import torch

torch.set_num_threads(1)
