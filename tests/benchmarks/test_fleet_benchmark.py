"""benchmarks/fleet.py's aggregation and table, and benchmarks/scaling.py's cache simulation (no servers, no Ray)."""

from __future__ import annotations

import pytest

from benchmarks import fleet, scaling

COSTS = {"precisions": {"bf16": {"warm_bytes": 1.4e6, "hot_bytes": 21.5e6, "cold_load_ms": 48.0, "promotion_ms": 11.6},
                        "fp32": {"warm_bytes": 2.5e6, "hot_bytes": None, "cold_load_ms": 60.0, "promotion_ms": None}}}


def test_simulation_shares_add_up_and_more_hosts_or_cache_never_hurt():
    one = scaling.simulate(COSTS, "bf16", 2000, 1, hot_gib=0.5, warm_gib=1.0, s=1.0, n_requests=40_000)
    assert one["p_hot"] + one["p_warm"] + one["p_cold"] + one["p_first_touch"] == pytest.approx(1.0)
    assert one["hot_slots"] == int(0.5 * 2**30 // 21.5e6) and one["warm_slots"] == int(2**30 // 1.4e6)
    four = scaling.simulate(COSTS, "bf16", 2000, 4, hot_gib=0.5, warm_gib=1.0, s=1.0, n_requests=40_000)
    assert four["p_hot"] > one["p_hot"] and four["swap_in_ms_per_request"] < one["swap_in_ms_per_request"]
    assert four["p_cold"] == 0.0  # 500 tasks a host fit its warm tier: only first touches miss
    expected = one["p_warm"] * 11.6 + one["p_cold"] * (48.0 + 11.6)
    assert one["swap_in_ms_per_request"] == pytest.approx(expected)


def test_simulation_without_a_hot_tier_pays_only_cold_loads():
    r = scaling.simulate(COSTS, "fp32", 2000, 1, hot_gib=4, warm_gib=0.5, s=1.2, n_requests=20_000)
    assert r["p_hot"] == 0.0 and r["hot_slots"] == 0
    assert r["swap_in_ms_per_request"] == pytest.approx(r["p_cold"] * 60.0)


def test_fleet_aggregate_takes_medians_of_good_rounds_and_ratios_to_single():
    def rnd(b1, rps):
        return {"figures": {"hop_b1_p50_ms": b1, "mixed_rps": rps, "stickiness": None}}

    rounds = {"single": [rnd(10, 100), rnd(12, 90), rnd(11, 95)],
              "ray-1": [rnd(22, 50), {"error": "not ready"}, rnd(20, 60)]}
    agg = fleet.aggregate(rounds)
    assert agg["single"]["median"]["hop_b1_p50_ms"] == 11
    assert agg["ray-1"]["median"]["hop_b1_p50_ms"] == 21 and agg["ray-1"]["rounds_ok"] == 2
    assert agg["ray-1"]["ratio_to_single"]["hop_b1_p50_ms"] == pytest.approx(21 / 11)
    assert agg["ray-1"]["ratio_to_single"]["mixed_rps"] == pytest.approx(55 / 95)
    assert agg["single"]["median"]["stickiness"] is None


def test_fleet_commands_and_cpu_budget():
    assert fleet.command("single")[-1] == "serve"
    assert fleet.command("ray-2")[-3:] == ["--ray", "--replicas", "2"]
    env = fleet.environment("ray-2", 1234, fleet.Path("/s"), fleet.Path("/t"), threads=1)
    assert env["SUPERMASK_TORCH_THREADS"] == env["OMP_NUM_THREADS"] == "1" and env["SUPERMASK_PORT"] == "1234"
    assert fleet.environment("single", 1, fleet.Path("/s"), fleet.Path("/t"), threads=2)["SUPERMASK_TORCH_THREADS"] == "2"
    assert 20000 <= fleet.free_port() < 30000
