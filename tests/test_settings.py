"""QuantizeConfig defaults and cross-field rules."""

import pytest

from moecompress.errors import UserError
from moecompress.settings import build_config


def test_gptq_defaults_to_weight_order_and_rtn_to_none():
    g = build_config(method="gptq")
    assert g.act_order == "weight" and g.spec().act_order == "weight"
    assert g.refine_rounds == 1 and g.weight_by_routing
    assert build_config(method="rtn").act_order is None
    assert build_config(method="gptq", act_order=None).act_order is None


def test_act_order_is_refused_for_rtn_and_group_outside_gptq_format():
    with pytest.raises(UserError, match="GPTQ only"):
        build_config(method="rtn", act_order="weight")
    with pytest.raises(UserError, match="only in the GPTQ format"):
        build_config(method="gptq", act_order="group")
    assert build_config(method="gptq", act_order="group", format="gptq").act_order == "group"


def test_unknown_key_and_bad_refine_rounds_are_one_line_errors():
    with pytest.raises(UserError, match="unknown key"):
        build_config(refine_round=2)
    with pytest.raises(UserError, match="refine_rounds"):
        build_config(refine_rounds=-1)


def test_booleans_are_not_numbers():
    """YAML's true would otherwise read as 1: group_size true quantized with groups of one."""
    for key in ("group_size", "bits", "calib_samples", "damp"):
        with pytest.raises(UserError, match=f"'{key}': expected a number, got true"):
            build_config(**{key: True})
    assert build_config(symmetric=False).symmetric is False  # a real boolean setting still takes one
