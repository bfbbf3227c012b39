"""The owner's side of SecAgg+ that does not need a network: the legacy strategy shim and the restore.

The protocol itself runs end to end over real SuperNodes in
``tests/integration/test_federated_run.py::test_secure_aggregation_equals_fedavg_and_leaves_integer_buffers_alone``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from flwr.common import Code, FitRes, Parameters, Status
from flwr.server.client_manager import SimpleClientManager

from xkt.server.secure_aggregation import _GivenSites, restore
from xkt.shared.errors import ConfigError

LAYOUT = {"conv.weight": (2, 3), "fc.bias": (4,)}


def test_restore_names_the_float64_list_in_layout_order_as_float32() -> None:
    arrays = [np.ones((2, 3), np.float64) / 3, np.arange(4, dtype=np.float64)]
    restored = restore(arrays, LAYOUT)
    assert list(restored) == ["conv.weight", "fc.bias"]
    assert all(a.dtype == np.float32 for a in restored.values())
    np.testing.assert_allclose(restored["conv.weight"], 1 / 3, rtol=1e-7)


@pytest.mark.parametrize(
    "arrays",
    [
        [np.zeros((2, 3))],  # one array short
        [np.zeros((3, 2)), np.zeros(4)],  # wrong shape
        [np.zeros((2, 3)), np.array([0.0, np.nan, 0.0, 0.0])],  # not finite
    ],
)
def test_restore_refuses_what_does_not_fit_the_model(arrays: list[np.ndarray]) -> None:
    with pytest.raises(ConfigError) as caught:
        restore(arrays, LAYOUT)
    assert caught.value.reason == "bad-aggregate"


def test_the_strategy_asks_exactly_the_given_sites_with_the_round_settings() -> None:
    grid = cast(Any, SimpleNamespace(run=SimpleNamespace(run_id=7)))
    strategy = _GivenSites(grid, [3, 11], {"round": 2, "method": "shot"})
    chosen = strategy.configure_fit(2, Parameters([], ""), SimpleClientManager())
    assert [proxy.node_id for proxy, _ in chosen] == [3, 11]  # type: ignore[attr-defined]
    assert all(ins.config == {"round": 2, "method": "shot"} for _, ins in chosen)


def test_the_strategy_keeps_the_workflows_aggregate() -> None:
    """SecAgg+ writes the unmasked mean into every result; averaging them again would only add rounding."""
    strategy = _GivenSites(cast(Any, None), [], {})
    mean = Parameters([b"x"], "numpy.ndarray")
    result = FitRes(Status(Code.OK, ""), mean, 5, {})
    assert strategy.aggregate_fit(1, [(cast(Any, None), result)], []) == (mean, {})
    assert strategy.aggregate_fit(1, [], []) == (None, {})
