"""One rule for rank, rank_scale and target_ratio at every entry point (docs/method.md#rank-settings).

The same bad values go to every place a user can give them: the layers, the core's whole-model
functions, the timm models' keyword arguments, both command lines and the fairseq settings. A test
fails if any entry point accepts a value the others refuse, or words the refusal differently.
"""
import math
import types

import pytest
import torch
from torch import nn

import fnl
from fnl._validate import check_rank, check_rank_choice, check_rank_scale, check_target_ratio

BAD_RANK_SCALES = [0, 0.0, -0.5, math.nan, math.inf, True, "0.5"]
BAD_TARGET_RATIOS = [0, 0.0, -0.1, math.nan, math.inf, True, "0.3"]
RANK_SCALE_RULE = r"rank[-_]scale must be a finite float (> 0|in \(0, 1\]) \(leave it unset for the dense model\)"
TARGET_RATIO_RULE = r"target[-_]ratio must be a finite float > 0"


def _convnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _timm():
    timm = pytest.importorskip("timm")
    import fnl_timm  # noqa: F401  (registers the fnl models)
    return timm


def _train_cli(flag, value, capsys):
    _timm()
    from fnl_timm import train
    with pytest.raises(SystemExit) as e:  # argparse's parser.error: one line, exit status 2
        train.main(["--dataset", "digits", "--epochs", "1", flag, str(value)])
    assert e.value.code == 2
    raise ValueError(capsys.readouterr().err)


def _compress_cli(value, capsys, tmp_path):
    _timm()
    from fnl_timm import compress
    with pytest.raises(SystemExit) as e:
        compress.main(["--model", "fnl_test_resnet", "--output", str(tmp_path / "out"), "--target-ratio", str(value)])
    assert e.value.code == 2
    raise ValueError(capsys.readouterr().err)


def _fairseq_settings(value):
    pytest.importorskip("fairseq")
    from fnl_fairseq.models.fnl_transformer import FNLSettings
    FNLSettings.from_cfg(types.SimpleNamespace(rank_scale=value))


RANK_SCALE_ENTRIES = {
    "layer": lambda v, **_: fnl.FactorizedLinear(4, 4, rank_scale=v),
    "conv_layer": lambda v, **_: fnl.FactorizedConv2d(4, 4, 3, rank_scale=v),
    "factorize": lambda v, **_: fnl.factorize(_convnet(), rank_scale=v),
    "tensor_layer": lambda v, **_: fnl.TTConv2d(8, 8, 3, rank_scale=v),
    "tensorize": lambda v, **_: fnl.tensorize(_convnet(), rank_scale=v),
    "timm_model": lambda v, **_: _timm().create_model("fnl_test_resnet", rank_scale=v),
    "timm_wrn_tt": lambda v, **_: _timm().create_model("fnl_wrn28_10", depth=10, width=1, conv="tt", rank_scale=v),
    "timm_any": lambda v, **_: _timm().create_model("fnl", base="test_resnet", rank_scale=v),
    "fnl_train": lambda v, capsys, **_: _train_cli("--rank-scale", v, capsys),
    "fairseq": lambda v, **_: _fairseq_settings(v),
}
TARGET_RATIO_ENTRIES = {
    "factorize": lambda v, **_: fnl.factorize(_convnet(), target_ratio=v),
    "solve_rank_scale": lambda v, **_: fnl.solve_rank_scale(_convnet(), v),
    "tensorize": lambda v, **_: fnl.tensorize(_convnet(), target_ratio=v),
    "solve_tensor_scale": lambda v, **_: fnl.solve_tensor_scale(_convnet(), v, "tucker"),
    "compress": lambda v, **_: fnl.compress(_convnet(), target_ratio=v, input_size=(3, 8, 8)),
    "timm_model": lambda v, **_: _timm().create_model("fnl_test_resnet", target_ratio=v),
    "timm_any": lambda v, **_: _timm().create_model("fnl", base="test_resnet", target_ratio=v),
    "fnl_train": lambda v, capsys, **_: _train_cli("--target-ratio", v, capsys),
    "fnl_compress": lambda v, capsys, tmp_path, **_: _compress_cli(v, capsys, tmp_path),
}
CLI = {"fnl_train", "fnl_compress", "fairseq"}  # flags parsed as floats: no bools or strings reach them


def _numeric(v):
    return isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool))


@pytest.mark.parametrize("value", BAD_RANK_SCALES, ids=repr)
@pytest.mark.parametrize("entry", list(RANK_SCALE_ENTRIES))
def test_every_entry_point_refuses_the_same_rank_scales(entry, value, capsys, tmp_path):
    if entry in CLI - {"fairseq"} and not _numeric(value):
        pytest.skip("argparse reads the flag as a float")
    with pytest.raises((ValueError, TypeError), match=RANK_SCALE_RULE):
        RANK_SCALE_ENTRIES[entry](value, capsys=capsys, tmp_path=tmp_path)


@pytest.mark.parametrize("value", BAD_TARGET_RATIOS, ids=repr)
@pytest.mark.parametrize("entry", list(TARGET_RATIO_ENTRIES))
def test_every_entry_point_refuses_the_same_target_ratios(entry, value, capsys, tmp_path):
    if entry in CLI and not _numeric(value):
        pytest.skip("argparse reads the flag as a float")
    with pytest.raises((ValueError, TypeError), match=TARGET_RATIO_RULE):
        TARGET_RATIO_ENTRIES[entry](value, capsys=capsys, tmp_path=tmp_path)


def test_the_rule_at_its_boundaries():
    assert check_rank_scale(1e-9) == 1e-9 and check_rank_scale(3) == 3.0 and check_rank_scale(2.5) == 2.5
    assert check_rank_scale(1.0, at_most_one=True) == 1.0
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        check_rank_scale(1.0001, at_most_one=True)
    assert check_target_ratio(1.3) == 1.3 and check_target_ratio(1e-9) == 1e-9
    assert check_rank(1) == 1
    for bad, error in ((0, ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="rank must be an int >= 1"):
            check_rank(bad)
    assert check_rank_choice() is None and check_rank_choice(rank_scale=0.5) == "rank_scale"
    with pytest.raises(ValueError, match="give at most one of rank, rank_scale or target_ratio; got rank_scale=0.5, "
                                         "target_ratio=0.5"):
        check_rank_choice(rank_scale=0.5, target_ratio=0.5)
    with pytest.raises(ValueError, match="give exactly one of rank, rank_scale or target_ratio; got none"):
        check_rank_choice(required=True)


def test_one_rank_scale_above_one_is_overcomplete_not_an_error():
    layer = fnl.FactorizedLinear(8, 4, rank_scale=1.5)  # the paper's overcomplete factors
    assert layer.rank == 6
    with pytest.raises(ValueError, match=r"rank_scale must be a finite float in \(0, 1\]"):
        fnl.TTConv2d(8, 8, 3, rank_scale=1.5)  # tensor ranks cannot exceed the mode sizes


def test_target_ratio_above_one_reaches_the_solver_everywhere():
    """Above 1 is allowed by the rule (overcomplete square models reach it); a model that cannot
    reach it gets the solver's answer with its range, not a range error of the entry point."""
    assert fnl.solve_rank_scale(_convnet(), 1.2, square=True) > 0
    with pytest.raises(ValueError, match="target_ratio=50.0 cannot be reached"):
        fnl.solve_rank_scale(_convnet(), 50.0)
    with pytest.raises(ValueError, match="target_ratio=1.2 cannot be reached: compression keeps at most"):
        fnl.compress(_convnet(), target_ratio=1.2, input_size=(3, 8, 8))
    timm = _timm()
    with pytest.raises(ValueError, match="target_ratio=5.0 cannot be reached"):
        timm.create_model("fnl_test_resnet", target_ratio=5.0)
    with pytest.raises(ValueError, match="target_ratio=5.0 cannot be reached"):
        timm.create_model("fnl", base="test_resnet", target_ratio=5.0)
