"""``xkt-bench federated``'s pure parts: the virtual sites' layout and policy, timing and class-share maths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xkt.benchmarks import federated_sim
from xkt.benchmarks.federated_sim import (
    RAY_SOCKET_SUFFIX,
    UNIX_PATH_MAX,
    SimulationPlan,
    check_site_count,
    class_shares,
    collect_results,
    federation_config_args,
    lay_out_sites,
    policy_block,
    prepare_data,
    ray_temp_dir,
    round_timing,
    site_data_folder,
)
from xkt.server.federated_server import FederationConfig
from xkt.shared.errors import DataError, PolicyError, TransportError
from xkt.shared.shapes_benchmark import ShapesConfig
from xkt.shared.signing import fingerprint, generate_keypair, load_public_key
from xkt.shared.site_policy import check_method, check_owner, load_policy


def fake_site(folder: Path) -> Path:
    """The parts of a site folder the layout reads: site.toml, target/, eval/labels.csv."""
    (folder / "target").mkdir(parents=True)
    (folder / "target" / "000000.png").write_bytes(b"png")
    (folder / "eval").mkdir()
    (folder / "eval" / "labels.csv").write_text("path,label\n", encoding="utf-8")
    (folder / "site.toml").write_text('[modality]\nname = "depth"\n', encoding="utf-8")
    return folder


def fake_data(root: Path, sites: int) -> Path:
    for index in range(sites):
        fake_site(root / f"depth-site{index}")
    (root / "dataset.json").write_text(json.dumps({"sites": sites}), encoding="utf-8")
    return root


def plan_for(tmp_path: Path, sites: int = 2) -> SimulationPlan:
    _, pub = generate_keypair(tmp_path / "keys")
    return SimulationPlan(
        work=tmp_path / "work",
        data=fake_data(tmp_path / "data", sites),
        model=tmp_path / "model",
        owner_key=pub,
        sites=sites,
        method="cmcd",
    )


def test_the_policy_block_allows_exactly_this_owner_and_method(tmp_path: Path) -> None:
    _, pub = generate_keypair(tmp_path / "keys")
    owner = fingerprint(load_public_key(pub))
    site = fake_site(tmp_path / "site")
    with (site / "site.toml").open("a", encoding="utf-8") as handle:
        handle.write(policy_block(owner, ["shot"]))
    policy = load_policy(site)
    check_owner(policy, owner)
    check_method(policy, "shot")
    with pytest.raises(PolicyError):
        check_method(policy, "cmcd")
    assert policy.max_upload_bytes > 0
    assert {"accuracy", "num_examples", "train_seconds", "im", "mean_entropy"} <= set(policy.metrics)


def test_layout_copies_each_site_with_its_policy_and_an_empty_out(tmp_path: Path) -> None:
    plan = plan_for(tmp_path)
    (plan.sites_root / "site-0" / "out").mkdir(parents=True)
    (plan.sites_root / "site-0" / "out" / "local.safetensors").write_bytes(b"stale")  # a previous run's state
    folders = lay_out_sites(plan)
    assert folders == [plan.sites_root / f"site-{k}" / "site" for k in (0, 1)]
    for folder in folders:
        assert (folder / "target" / "000000.png").is_file()
        assert load_policy(folder).allowed_methods == ("cmcd",)
        assert not any((folder.parent / "out").iterdir())
    assert "[policy]" not in (plan.data / "depth-site0" / "site.toml").read_text()  # the data set is untouched


def test_the_run_config_waits_for_every_site_and_points_at_the_layout(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, sites=3)
    cfg = plan.federation()
    assert cfg.min_sites == 3 and cfg.method == "cmcd"
    assert Path(cfg.simulation_root) == plan.sites_root.resolve()
    assert cfg.straggler_timeout_s == cfg.round_timeout_s  # no quorum shortcut: every site in every round
    assert FederationConfig.from_run_config({k.replace("_", "-"): v for k, v in vars(cfg).items()}) == cfg
    assert plan.timeout_s() > plan.rounds * plan.round_timeout_s
    assert 1 <= plan.slots() <= 3  # never more slots than sites
    assert federation_config_args(3, 1) == ("--federation-config", "num-supernodes=3 client-resources-num-cpus=1")


def test_a_missing_site_folder_or_another_site_count_is_refused(tmp_path: Path) -> None:
    data = fake_data(tmp_path / "data", 2)
    assert site_data_folder(data, "depth", 1, 2) == data / "depth-site1"
    with pytest.raises(DataError, match="not a site folder"):
        site_data_folder(data, "ir", 0, 2)
    with pytest.raises(DataError, match="split across 2 sites, not 4") as error:
        check_site_count(data, 4)
    assert error.value.reason == "site-count-mismatch"


def test_round_timing_on_known_numbers() -> None:
    four_sites = {str(n): {"train-seconds": 3.0} for n in range(4)}  # 12 s of training per round ...
    rounds = [
        {"seconds": 10.0, "local_seconds_max": 3.0, "metrics": four_sites},
        {"seconds": 6.0, "local_seconds_max": 3.0, "metrics": four_sites},
    ]
    timing = round_timing(rounds, slots=2)  # ... on 2 slots: at best 6 s per round
    assert timing["round_seconds_mean"] == 8.0
    assert timing["local_seconds_max_mean"] == 3.0
    assert timing["outside_local_share"] == pytest.approx(1 - 6 / 16)
    assert timing["outside_packed_share"] == pytest.approx(1 - 24 / (2 * 16))
    assert round_timing([])["outside_local_share"] == 0.0


def test_class_shares_and_total_variation_on_known_numbers() -> None:
    iid = class_shares({"site0": {"a": 5, "b": 5}, "site1": {"a": 5, "b": 5}})
    assert iid["tv_mean"] == 0.0 and iid["share_min"] == iid["share_max"] == 0.5
    skewed = class_shares({"site0": {"a": 9, "b": 1}, "site1": {"a": 1, "b": 9}})
    assert skewed["shares"]["site0"] == {"a": 0.9, "b": 0.1}
    assert skewed["tv_to_pooled"]["site0"] == pytest.approx(0.4)  # ½(|0.9 − 0.5| + |0.1 − 0.5|)
    assert skewed["tv_mean"] == pytest.approx(0.4)


def test_ray_keeps_its_files_in_the_work_folder_when_socket_paths_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(federated_sim, "UNIX_PATH_MAX", 4096)
    with ray_temp_dir(tmp_path) as folder:
        assert folder == (tmp_path / "ray").resolve() and folder.is_dir()
    assert folder.is_dir()  # Ray's logs stay with the run


def test_ray_gets_a_short_temp_folder_when_the_work_folder_is_deep(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    with ray_temp_dir(deep) as folder:
        assert len(str(folder)) + RAY_SOCKET_SUFFIX <= UNIX_PATH_MAX
        assert (deep / "ray").resolve() == folder.resolve()  # found from the work folder while the run lasts
    assert not folder.exists() and not (deep / "ray").is_symlink()


def test_a_run_that_stopped_early_or_a_site_without_report_is_an_error(tmp_path: Path) -> None:
    plan = plan_for(tmp_path)
    with pytest.raises(TransportError, match="no rounds.json"):
        collect_results(plan, 1.0)
    (plan.work / "out").mkdir(parents=True)
    record = {"round": 1, "seconds": 2.0, "local_seconds_max": 1.0, "metrics": {"7": {"accuracy": 0.5}}}
    (plan.work / "out" / "rounds.json").write_text(json.dumps({"rounds": [record]}), encoding="utf-8")
    with pytest.raises(TransportError, match="1 of 3 rounds"):
        collect_results(plan, 1.0)
    one_round = SimulationPlan(**{**vars(plan), "rounds": 1})
    with pytest.raises(TransportError, match="virtual site 0 published no report"):
        collect_results(one_round, 1.0)
    for index in (0, 1):
        out = plan.sites_root / f"site-{index}" / "out"
        out.mkdir(parents=True)
        (out / "report.json").write_text(json.dumps({"accuracy_after": 0.5}), encoding="utf-8")
        (out / "node.json").write_text(json.dumps({"node_id": 7 + index}), encoding="utf-8")
    result = collect_results(one_round, 1.0)
    assert [s["replied_rounds"] for s in result["sites"]] == [[1], []]  # node 8 never replied
    assert result["accuracy_mean"] == 0.5 and result["class_shares"] is None


def test_rendered_data_is_reused_only_with_the_same_settings(tmp_path: Path) -> None:
    shapes = ShapesConfig(size=16, per_class=1, site_per_class=4, sites=2, skew=1.0, modalities=("depth",))
    data = prepare_data(tmp_path, shapes)
    stamp = (data / "dataset.json").stat().st_mtime_ns
    assert prepare_data(tmp_path, shapes) == data and (data / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="skew: 1.0 → 3.0") as error:
        prepare_data(tmp_path, ShapesConfig(**{**vars(shapes), "skew": 3.0}))
    assert error.value.reason == "settings-changed"
