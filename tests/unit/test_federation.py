"""Federated exchange: the FedBN partition, checked merging, FedAvg and the DP upload, by hand."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from xkt.shared.errors import ConfigError, VerificationError
from xkt.shared.federation import (
    clip_update,
    gaussian_noise,
    merge_state,
    privatise_update,
    shared_layout,
    shared_names,
    split_state,
    update_bytes,
    weighted_average,
)
from xkt.shared.models import SourceClassifier, batchnorm_layers, build_model, resolve_arch


def tiny_model() -> SourceClassifier:
    torch.manual_seed(0)
    return build_model(resolve_arch("resnet_tiny", {}, 3))


def f32(*values: float) -> NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


# ------------------------------------------------------------------ the partition


def test_running_statistics_and_integer_buffers_never_travel() -> None:
    model = tiny_model()
    names = shared_names(model)
    assert not [n for n in names if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    state = model.state_dict()
    assert all(torch.is_floating_point(state[n]) for n in names)
    bn_affine = {f"{layer}.{p}" for layer, _ in batchnorm_layers(model) for p in ("weight", "bias")}
    assert bn_affine <= set(names)  # plain FedBN-lite: BN affine parameters are averaged
    assert {"classifier.weight_v", "classifier.weight_g", "classifier.bias"} <= set(names)
    assert "backbone.conv1.weight" in names and "bottleneck.fc.weight" in names


def test_full_fedbn_keeps_bn_affine_local_too() -> None:
    model = tiny_model()
    names = shared_names(model, keep_bn_affine_local=True)
    bn_prefixes = tuple(f"{layer}." for layer, _ in batchnorm_layers(model))
    assert not [n for n in names if n.startswith(bn_prefixes)]
    assert {"classifier.weight_v", "classifier.weight_g", "classifier.bias", "bottleneck.fc.bias"} <= set(names)


def test_shared_names_follow_state_dict_order() -> None:
    model = tiny_model()
    order = list(model.state_dict())
    names = shared_names(model)
    assert names == sorted(names, key=order.index)
    assert names == shared_names(tiny_model())


def test_bn_at_the_top_level_is_found_too() -> None:
    names = shared_names(torch.nn.BatchNorm1d(2))
    assert names == ["weight", "bias"]
    assert shared_names(torch.nn.BatchNorm1d(2), keep_bn_affine_local=True) == []


# ------------------------------------------------------------------ split and merge


def test_split_then_merge_is_exact() -> None:
    model = tiny_model()
    state = model.state_dict()
    names = shared_names(model)
    shared, local = split_state(state, names)
    assert set(shared) == set(names) and set(local) == set(state) - set(names)
    assert all(a.dtype == np.float32 for a in shared.values())
    merged = merge_state(local, shared, shared_layout(state, names))
    assert set(merged) == set(state)
    for name, tensor in state.items():
        assert merged[name].dtype == tensor.dtype
        assert torch.equal(merged[name], tensor), name
    model.load_state_dict(merged)  # strict: nothing missing, nothing extra


def test_split_copies_so_later_training_does_not_leak_in() -> None:
    model = torch.nn.Linear(2, 1)
    shared, local = split_state(model.state_dict(), ["weight"])
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.add_(1.0)
    assert not np.array_equal(shared["weight"], model.weight.detach().numpy())
    assert not torch.equal(local["bias"], model.bias)


def test_split_refuses_integer_or_unknown_names() -> None:
    state = torch.nn.BatchNorm1d(2).state_dict()
    for name in ("num_batches_tracked", "nope"):
        with pytest.raises(ConfigError) as error:
            split_state(state, [name])
        assert error.value.reason == "bad-shared-names" and name in error.value.message


def test_float64_from_secagg_comes_back_float32() -> None:
    layout = {"w": ((2,), torch.float32)}
    merged = merge_state({}, {"w": np.array([0.5, -1.25], dtype=np.float64)}, layout)
    assert merged["w"].dtype == torch.float32
    assert merged["w"].tolist() == [0.5, -1.25]


def test_read_only_arrays_from_the_wire_are_copied() -> None:
    array = np.frombuffer(np.array([1.0, 2.0], dtype=np.float32).tobytes(), dtype=np.float32)
    assert not array.flags.writeable
    merged = merge_state({}, {"w": array}, {"w": ((2,), torch.float32)})
    merged["w"].add_(1.0)
    assert array.tolist() == [1.0, 2.0]


LAYOUT = {"a": ((2,), torch.float32), "b": ((1, 2), torch.float32)}
GOOD: dict[str, Any] = {"a": f32(1, 2), "b": np.ones((1, 2), dtype=np.float32)}


@pytest.mark.parametrize(
    ("arrays", "bad_name", "words"),
    [
        ({"a": f32(1, 2)}, "b", "lacks"),
        ({**GOOD, "c": f32(0)}, "c", "unexpected"),
        ({**GOOD, "b": np.ones((2, 1), dtype=np.float32)}, "b", "shape (2, 1), expected (1, 2)"),
        ({**GOOD, "a": np.array([1, 2], dtype=np.int64)}, "a", "dtype int64"),
        ({**GOOD, "a": [1.0, 2.0]}, "a", "list"),
    ],
)
def test_bad_update_names_the_first_bad_array(arrays: dict[str, Any], bad_name: str, words: str) -> None:
    with pytest.raises(VerificationError) as error:
        merge_state({}, arrays, LAYOUT)
    assert error.value.reason == "bad-update"
    assert repr(bad_name) in error.value.message and words in error.value.message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_update_is_refused(value: float) -> None:
    with pytest.raises(VerificationError) as error:
        merge_state({}, {**GOOD, "b": np.array([[0.0, value]])}, LAYOUT)
    assert error.value.reason == "non-finite-update" and "'b'" in error.value.message


def test_a_shared_name_that_is_also_local_is_refused() -> None:
    with pytest.raises(ConfigError, match="'a'"):
        merge_state({"a": torch.zeros(2)}, GOOD, LAYOUT)


def test_update_bytes() -> None:
    assert update_bytes({"a": np.zeros((3, 4), dtype=np.float32), "b": np.zeros(5, dtype=np.float64)}) == 48 + 40


# ------------------------------------------------------------------ FedAvg


def test_weighted_average_by_hand() -> None:
    # w = (1, 3): a = (1·[1, 2] + 3·[5, 6]) / 4 = [16/4, 20/4] = [4, 5]; b = (1·0 + 3·2) / 4 = 1.5.
    first = {"a": f32(1, 2), "b": np.array([[0.0]], dtype=np.float32)}
    second = {"a": f32(5, 6), "b": np.array([[2.0]], dtype=np.float64)}
    average = weighted_average([(first, 1.0), (second, 3)])
    assert list(average) == ["a", "b"]
    assert average["a"].tolist() == [4.0, 5.0] and average["b"].tolist() == [[1.5]]
    assert all(a.dtype == np.float32 for a in average.values())


def test_weighted_average_accumulates_in_float64() -> None:
    # (30000001·1 + 30000000·(−1)) / 60000001 = 1/60000001 ≈ 1.6667e-8.  Above 2^24 float32
    # steps by 2, so a float32 sum would give 0 or 2 / 60000001 instead.
    updates = [({"x": f32(1)}, 30_000_001.0), ({"x": f32(-1)}, 30_000_000.0)]
    assert weighted_average(updates)["x"][0] == pytest.approx(1 / 60_000_001, rel=1e-6)


def test_a_zero_weight_site_does_not_count() -> None:
    assert weighted_average([({"x": f32(7)}, 0.0), ({"x": f32(1)}, 2.0)])["x"].tolist() == [1.0]


@pytest.mark.parametrize(
    ("updates", "reason"),
    [
        ([], "no-updates"),
        ([({"x": f32(1)}, 0.0)], "bad-weight"),
        ([({"x": f32(1)}, 2.0), ({"x": f32(1)}, -1.0)], "bad-weight"),
        ([({"x": f32(1)}, math.nan)], "bad-weight"),
        ([({"x": f32(1)}, 1.0), ({"y": f32(1)}, 1.0)], "bad-update"),
        ([({"x": f32(1)}, 1.0), ({"x": f32(1, 2)}, 1.0)], "bad-update"),
        ([({"x": f32(1)}, 1.0), ({"x": f32(math.inf)}, 1.0)], "non-finite-update"),
    ],
)
def test_weighted_average_refusals(updates: list[tuple[dict[str, Any], float]], reason: str) -> None:
    with pytest.raises(VerificationError) as error:
        weighted_average(updates)
    assert error.value.reason == reason


def test_mismatched_update_is_named_with_its_index() -> None:
    with pytest.raises(VerificationError, match=r"update 1 lacks the array 'x'"):
        weighted_average([({"x": f32(1)}, 1.0), ({"y": f32(1)}, 1.0)])


# ------------------------------------------------------------------ differential privacy


def test_clip_scales_the_global_norm_down_to_c() -> None:
    # ‖[3, 4]‖ = 5; with C = 1 the factor is 1/5.
    clipped, norm = clip_update({"w": f32(3, 4)}, 1.0)
    assert norm == 5.0
    assert clipped["w"].tolist() == pytest.approx([0.6, 0.8])


def test_clip_norm_spans_every_array() -> None:
    # ‖([3], [4])‖ = 5 over both arrays together; C = 2.5 halves each.
    clipped, norm = clip_update({"a": f32(3), "b": f32(4)}, 2.5)
    assert norm == 5.0
    assert clipped["a"].tolist() == [1.5] and clipped["b"].tolist() == [2.0]


def test_clip_leaves_a_small_update_alone() -> None:
    clipped, norm = clip_update({"w": f32(0.3, 0.4)}, 1.0)
    assert norm == pytest.approx(0.5)
    assert clipped["w"].tolist() == pytest.approx([0.3, 0.4])
    zero, zero_norm = clip_update({"w": f32(0, 0)}, 1.0)
    assert zero_norm == 0.0 and zero["w"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_clip_refuses_a_bad_norm(bad: float) -> None:
    with pytest.raises(ConfigError) as error:
        clip_update({"w": f32(1)}, bad)
    assert error.value.reason == "bad-dp-setting"


def test_clip_refuses_a_non_finite_update() -> None:
    with pytest.raises(VerificationError) as error:
        clip_update({"w": f32(1, math.nan)}, 1.0)
    assert error.value.reason == "non-finite-update"


def test_gaussian_noise_has_the_asked_std_and_zero_mean() -> None:
    delta = {"w": np.full(200_000, 2.0, dtype=np.float32)}
    noisy32 = gaussian_noise(delta, 0.3, np.random.default_rng(0))["w"]
    assert noisy32.dtype == np.float32 and noisy32.shape == (200_000,)
    noisy = noisy32.astype(np.float64)
    assert np.std(noisy - 2.0) == pytest.approx(0.3, rel=0.05)
    assert abs(np.mean(noisy - 2.0)) < 0.01  # standard error 0.3/√200000 ≈ 7e-4


def test_gaussian_noise_is_reproducible_only_through_the_generator() -> None:
    delta = {"w": np.zeros((3, 3), dtype=np.float32)}
    first = gaussian_noise(delta, 1.0, np.random.default_rng(7))["w"]
    again = gaussian_noise(delta, 1.0, np.random.default_rng(7))["w"]
    other = gaussian_noise(delta, 1.0, np.random.default_rng(8))["w"]
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert first.dtype == np.float32
    assert gaussian_noise(delta, 0.0, np.random.default_rng(7))["w"].tolist() == delta["w"].tolist()


def test_privatise_clips_then_adds_noise_of_std_z_times_c() -> None:
    # Δ = 10·1 over n = 100 000 elements: ‖Δ‖ = 10·√n, so clipped each element is C/√n = 2/√n.
    n = 100_000
    delta = {"w": np.full(n, 10.0, dtype=np.float32)}
    noisy = privatise_update(delta, clip_norm=2.0, noise_multiplier=0.5, rng=np.random.default_rng(1))["w"]
    residual = noisy.astype(np.float64) - 2.0 / math.sqrt(n)
    assert np.std(residual) == pytest.approx(0.5 * 2.0, rel=0.05)
    assert abs(np.mean(residual)) < 0.02  # standard error 1/√n ≈ 3e-3


def test_privatise_without_noise_is_plain_clipping() -> None:
    out = privatise_update({"w": f32(3, 4)}, clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    assert out["w"].tolist() == pytest.approx([0.6, 0.8])


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_privatise_refuses_a_bad_noise_multiplier(bad: float) -> None:
    with pytest.raises(ConfigError) as error:
        privatise_update({"w": f32(1)}, 1.0, bad, np.random.default_rng(0))
    assert error.value.reason == "bad-dp-setting"
