"""Test helper: two models hold the same state, entry by entry (tensors bit for bit)."""

import torch


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert torch.equal(sb[k], v) if isinstance(v, torch.Tensor) else sb[k] == v, k
