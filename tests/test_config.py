"""The configuration record (cbn._config.Config): the constructors take its fields with its defaults, its checks run
once when a setting is made or changed, and the rule of each check is the same whichever way the setting arrives."""
import dataclasses
import inspect

import numpy as np
import pytest

import cbn
from cbn._config import Config
from cbn.distributed import _as_class

from bn_helpers import full_snapshot


def _parameters(cls):
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()}


def test_constructors_take_the_record_fields_and_defaults():
    """BatchNorm and SyncBatchNorm take every field, FrozenBatchNorm those of an eval-mode batch norm, all with the
    record's defaults (written once, in cbn/_config.py)."""
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    fields["num_features"] = inspect.Parameter.empty  # required
    for cls in (cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d):
        assert _parameters(cls) == fields
    for cls in (cbn.SyncBatchNorm1d, cbn.SyncBatchNorm2d, cbn.SyncBatchNorm3d):
        assert _parameters(cls) == dict(fields, comm=None)
        assert inspect.signature(cls).parameters["comm"].kind is inspect.Parameter.KEYWORD_ONLY
    for cls in (cbn.FrozenBatchNorm1d, cbn.FrozenBatchNorm2d, cbn.FrozenBatchNorm3d):
        assert _parameters(cls) == {name: fields[name] for name in ("num_features", "eps", "dtype", "axis",
                                                                    "activation")}


@pytest.mark.parametrize("clipping", [{}, None])
def test_renorm_clipping_empty_dict_is_no_clipping(clipping):
    """renorm_clipping={} (no bound given) without renorm is the default, as None is; with renorm it means no
    clipping."""
    layer = cbn.BatchNorm2d(8, renorm_clipping=clipping)
    assert layer.renorm_clipping is None and repr(layer) == repr(cbn.BatchNorm2d(8))
    renorm = cbn.BatchNorm2d(8, renorm=True, renorm_clipping=clipping)
    x = np.random.default_rng(0).standard_normal((4, 8, 3, 3)).astype(np.float32)
    reference = cbn.BatchNorm2d(8, renorm=True, renorm_clipping={"rmax": np.inf, "dmax": np.inf})
    np.testing.assert_array_equal(renorm(x), reference(x))


@pytest.mark.parametrize("cls,axis", [(cbn.BatchNorm2d, -4), (cbn.BatchNorm3d, -5), (cbn.BatchNorm2d, 0),
                                      (cbn.BatchNorm1d, 0)])
def test_ghost_batches_refuse_channel_axis_zero_when_made(cls, axis):
    """A ghost-batch layer whose channel axis is axis 0 for every input rank it takes (a negative axis included)
    is refused when made, not at every call."""
    with pytest.raises(ValueError, match=r"must not be the channel axis: expected axis other than 0, got axis "
                                         rf"{axis}\b"):
        cls(8, axis=axis, virtual_batch_size=2)
    layer = cls(8, virtual_batch_size=2)
    before = full_snapshot(layer)
    with pytest.raises(ValueError, match=r"must not be the channel axis"):
        layer.axis = axis
    assert layer.axis == 1 and full_snapshot(layer) == before


def test_ghost_batches_with_an_axis_that_is_zero_for_one_rank_only():
    """BatchNorm1d(axis=-2) is axis 1 of (N, C, L) input: made, it trains on that; 2-D input (where -2 is axis 0)
    is refused at the call."""
    layer = cbn.BatchNorm1d(3, axis=-2, virtual_batch_size=2)
    layer(np.random.default_rng(1).standard_normal((4, 3, 5)).astype(np.float32))
    with pytest.raises(ValueError, match=r"expected a channel axis other than 0 for 2-D input, got axis 0"):
        layer(np.ones((3, 4), np.float32))


def test_settings_are_checked_when_set():
    """A setting changed on a layer is checked as in the constructor, takes effect at the next call, and a refused
    one changes nothing; those that shape the arrays are fixed."""
    layer = cbn.BatchNorm2d(3)
    x = np.random.default_rng(2).standard_normal((4, 3, 2, 2)).astype(np.float32)
    layer.momentum = 1.0
    layer(x)
    np.testing.assert_allclose(layer.running_mean, x.mean(axis=(0, 2, 3)), rtol=1e-6)
    before = full_snapshot(layer)
    for name, value, pattern in [("momentum", 2, r"momentum must be a number in \[0, 1\], got 2"),
                                 ("eps", -1.0, r"eps must be a finite number >= 0, got -1\.0"),
                                 ("activation", "gelu", r"activation must be None or 'relu', got 'gelu'"),
                                 ("axis", 4, r"axis must be in \[-4, 4\) for 4-D input, got 4"),
                                 ("renorm_clipping", {"rmax": 2}, r"renorm_clipping applies only with renorm=True")]:
        with pytest.raises((TypeError, ValueError), match=pattern):
            setattr(layer, name, value)
    assert layer.momentum == 1.0 and layer.eps == 1e-5 and layer.activation is None and layer.axis == 1
    assert full_snapshot(layer) == before
    for name in ("num_features", "affine", "track_running_stats", "dtype"):
        with pytest.raises(AttributeError, match=rf"{name} is fixed when a layer is made"):
            setattr(layer, name, getattr(layer, name))
    layer.renorm = True
    clipping = layer.renorm_clipping = {"rmax": 2}
    clipping["rmax"] = 0.5  # the layer keeps its own, checked copy
    assert layer.renorm_clipping == {"rmax": 2.0, "dmax": np.inf}


def test_conversion_targets_check_their_settings_when_set():
    """A frozen layer's fixed settings and SyncBatchNorm's lack of ghost batches hold for settings changed later."""
    frozen = cbn.FrozenBatchNorm2d(3)
    with pytest.raises(ValueError, match=r"a FrozenBatchNorm2d's momentum is fixed: expected 0\.0, got 0\.1"):
        frozen.momentum = 0.1
    frozen.activation = "relu"
    assert repr(frozen) == "FrozenBatchNorm2d(3, eps=1e-05, activation='relu')"
    sync = _as_class(cbn.BatchNorm2d(3), cbn.SyncBatchNorm2d, comm=None, _global_count=None)
    with pytest.raises(ValueError, match=r"SyncBatchNorm takes no virtual_batch_size .* got 2"):
        sync.virtual_batch_size = 2
    assert sync.virtual_batch_size is None


def test_repr_shows_every_setting_that_is_not_its_default():
    layer = cbn.BatchNorm1d(4, 0.1, None, False, True, np.float64, True, -1, "relu", virtual_batch_size=3)
    assert repr(layer) == ("BatchNorm1d(4, eps=0.1, momentum=None, affine=False, bias=False, track_running_stats=True, "
                           "dtype=float64, nan_guard=True, axis=-1, activation='relu', virtual_batch_size=3)")
    renorm = cbn.BatchNorm2d(2, renorm=True, renorm_clipping={"dmax": 5})
    assert repr(renorm).endswith(", renorm=True, renorm_clipping={'rmax': inf, 'dmax': 5.0})")
