"""Tests written to kill surviving mutants of fnl/conv.py (tests/README.md): the exact repr a user
reads, and the exact message of every argument check, naming the argument and what is allowed."""
import re

import pytest

import fnl

REPRS = [
    ({}, 'FactorizedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), rank=2)'),
    ({'padding': 1}, 'FactorizedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), rank=2, padding=(1, 1))'),
    ({'dilation': 2}, 'FactorizedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), rank=2, dilation=(2, 2))'),
    ({'bias': False}, 'FactorizedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), rank=2, bias=False)'),
    ({'path': 'dense'}, "FactorizedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), rank=2, path='dense')"),
    ({'padding': (1, 2), 'dilation': (2, 1), 'bias': False, 'path': 'dense'},
     "FactorizedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), rank=2, padding=(1, 2), dilation=(2, 1), "
     "bias=False, path='dense')"),
]


@pytest.mark.parametrize('kwargs,expected', REPRS, ids=[str(k) for k, _ in REPRS])
def test_repr_shows_exactly_the_non_default_settings(kwargs, expected):
    assert repr(fnl.FactorizedConv2d(4, 6, 3, rank=2, **kwargs)) == expected


ERRORS = [
    ({'in_channels': 0}, 'in_channels must be an int >= 1, got 0'),
    ({'out_channels': 0}, 'out_channels must be an int >= 1, got 0'),
    ({'kernel_size': 0}, 'kernel_size must be >= 1, got (0, 0)'),
    ({'stride': 0}, 'stride must be >= 1, got (0, 0)'),
    ({'dilation': 0}, 'dilation must be >= 1, got (0, 0)'),
    ({'padding': -1}, 'padding must be >= 0, got (-1, -1)'),
    ({'groups': 2}, 'groups must be 1 for FactorizedConv2d (grouped kernels are not factorized), got 2'),
    ({'padding_mode': 'reflect'}, "padding_mode must be 'zeros' for FactorizedConv2d, got 'reflect'"),
    ({'path': 'x'}, "path must be one of ('auto', 'factored', 'dense'), got 'x'"),
    ({'padding': 'same', 'stride': 2}, "padding='same' needs stride 1, got stride=(2, 2)"),
    ({'padding': 'same', 'kernel_size': 2},
     "padding='same' is supported only where it is symmetric (dilation*(kernel_size-1) even); "
     "got kernel_size=(2, 2), dilation=(1, 1)"),
    ({'padding': 'full'}, "padding must be an int, a pair, 'valid' or 'same', got 'full'"),
]


@pytest.mark.parametrize('kwargs,message', ERRORS, ids=[str(k) for k, _ in ERRORS])
def test_argument_errors_name_the_argument_exactly(kwargs, message):
    args = dict(in_channels=4, out_channels=6, kernel_size=3, rank=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f'^{re.escape(message)}$'):
        fnl.FactorizedConv2d(**args)


def test_valid_and_same_padding_resolve_to_pairs():
    assert fnl.FactorizedConv2d(4, 6, 3, rank=2, padding='valid').padding == (0, 0)
    assert fnl.FactorizedConv2d(4, 6, (3, 5), rank=2, padding='same').padding == (1, 2)
    assert fnl.FactorizedConv2d(4, 6, 3, rank=2, padding='same', dilation=(1, 2)).padding == (1, 2)
