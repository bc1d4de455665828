"""Test helpers: two models hold the same state; a bad file is refused without touching the model."""

import copy

import pytest
import torch

from obc_lightning.export import load_quantized


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert torch.equal(sb[k], v) if isinstance(v, torch.Tensor) else sb[k] == v, k


def assert_load_refused(path, target, match):
    """``load_quantized(path, target)`` raises a ValueError matching ``match``, dense and packed, and
    leaves ``target`` as it was: the same state and the same module types (nothing swapped in)."""
    before = copy.deepcopy(target)
    for packed in (False, True):
        with pytest.raises(ValueError, match=match):
            load_quantized(path, target, packed=packed)
        assert_same_state(target, before)
        assert [type(m) for m in target.modules()] == [type(m) for m in before.modules()]
