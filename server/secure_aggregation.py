"""SecAgg+ over the sites' updates: the owner learns their weighted mean, never one site's update.

Flower 1.41 has SecAgg+ (Bell et al., CCS 2020) only in its legacy workflow
(``SecAggPlusWorkflow`` with a ``LegacyContext`` and a legacy strategy; ../shared/reference/flower.md
§6), so a secure round has two phases:

1. ``train.adapt`` as in a plain round, except that each site keeps its update
   Δ = (its shared parameters) − (the global ones) on its own disk
   (:func:`xkt.client.federated_client.adapt_round`) and replies with metrics only;
2. the four SecAgg+ hops (setup, share keys, collect masked vectors, unmask) over exactly
   the sites that replied.  Flower's ``secaggplus_mod`` at each site masks the stored update;
   the owner unmasks only Σ nᵢΔᵢ / Σ nᵢ, which :func:`secure_mean` returns as float32.

Why updates rather than parameters: SecAgg+ clips every value to ±``clipping_range`` before it
quantises, and values beyond it saturate silently; a weight-norm gain or a classifier weight
can exceed 8, an update of one round does not (the site refuses one that would).  Why float32
and the layout check: Flower hands the aggregate back as float64 arrays in a list, so the
names, shapes and dtype are restored here against the model's own layout.  Integer buffers
never take part: :func:`xkt.shared.federation.shared_names` lists floating-point tensors only
(SecAgg+ would have turned a ``num_batches_tracked`` of 4 into 8.51).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from xkt.shared.errors import ConfigError
from xkt.shared.federation import Arrays

QUANTIZATION_RANGE = 1 << 22  # SecAgg+'s levels over [-clip, clip]: a step of 2·clip / 2²² per site
MODULUS_RANGE = 1 << 32


@dataclass(frozen=True)
class SecureRound:
    """One secure aggregation: who takes part, with which weight, and the protocol's bounds."""

    round: int
    examples: Mapping[int, float]  # node id → its example count (the FedAvg weight)
    settings: Mapping[str, Scalar]  # the round's settings; each site checks them again before unmasking starts
    clipping_range: float
    reconstruction_threshold: float  # share of the key shares needed to unmask (dropout tolerance)
    timeout_s: float  # per protocol hop


def secure_mean(grid: Grid, request: SecureRound, layout: Mapping[str, tuple[int, ...]]) -> Arrays:
    """Run SecAgg+ over ``request.examples``' sites; their weighted mean update, name → float32 array.

    ``layout`` is name → shape of the shared tensors in state-dict order, the order in which
    every site lists its update.  Raises ``quorum-lost`` if the protocol halted (too few
    sites left to unmask) and ``bad-aggregate`` if what came back does not fit the model.
    """
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=_GivenSites(grid, sorted(request.examples), dict(request.settings)),
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: request.round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # nothing travels down: sites have Δ
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every site holds a share of every other site's keys
        reconstruction_threshold=request.reconstruction_threshold,
        max_weight=max(request.examples.values()),  # so every site's weight nᵢ/max is <= 1: no overflow
        clipping_range=request.clipping_range,
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
        timeout=request.timeout_s,
    )
    workflow(grid, context)
    aggregate = context.state.array_records[MAIN_PARAMS_RECORD]
    if len(aggregate) == 0:
        raise ConfigError(
            f"round {request.round}: secure aggregation halted; too few sites stayed to unmask the sum",
            hint="see the sites' SuperNode logs; lower --secagg-threshold to tolerate more dropouts",
            reason="quorum-lost",
        )
    return restore(parameters_to_ndarrays(compat.arrayrecord_to_parameters(aggregate, keep_input=True)), layout)


def restore(arrays: list[np.ndarray], layout: Mapping[str, tuple[int, ...]]) -> Arrays:
    """Flower's float64 list back into named float32 arrays, checked against the model's layout."""
    if len(arrays) != len(layout):
        raise ConfigError(
            f"the secure aggregate has {len(arrays)} arrays, the model shares {len(layout)}",
            hint="a site runs a different model or xkt version; compare the sites' installs",
            reason="bad-aggregate",
        )
    restored: Arrays = {}
    for (name, shape), array in zip(layout.items(), arrays, strict=True):
        if tuple(array.shape) != tuple(shape) or not np.all(np.isfinite(array)):
            raise ConfigError(
                f"the secure aggregate's {name} has shape {array.shape} or non-finite values, expected {shape}",
                hint="a site runs a different model or xkt version; compare the sites' installs",
                reason="bad-aggregate",
            )
        restored[name] = array.astype(np.float32)
    return restored


class _GivenSites(Strategy):
    """The legacy strategy SecAgg+ needs, reduced to what xkt uses of it.

    ``configure_fit`` picks exactly the sites that finished this round's local training (the
    round's quorum already decided who takes part); ``aggregate_fit`` keeps the workflow's
    result, which is already the weighted mean (SecAgg+ puts it into every site's result).
    """

    def __init__(self, grid: Grid, nodes: list[int], settings: dict[str, Scalar]) -> None:
        self.grid, self.nodes, self.settings = grid, nodes, settings

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        run_id = self.grid.run.run_id
        return [
            (GridClientProxy(node, self.grid, run_id), FitIns(parameters, dict(self.settings))) for node in self.nodes
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[Any]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[Any], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None
