"""The step-cost curve (engine/step_cost.py): its arithmetic, its cache, and the engine's use
of it (measured where the runner allows, before any request, leaving the pools as they were)."""
from __future__ import annotations

import json

import pytest

from parafork.engine import step_cost
from parafork.engine.step_cost import StepCost
from parafork.llm import LLM


def test_the_curve_interpolates_never_falls_and_extrapolates_its_last_slope():
    curve = StepCost.from_times({1: 10.0, 2: 9.0, 4: 12.0, 8: 20.0})
    assert curve.ms == (10.0, 10.0, 12.0, 20.0)  # 2 rows timed faster than 1: noise, not a cheaper step
    assert curve(1) == 1.0 and curve(3) == pytest.approx(1.1) and curve(8) == 2.0
    assert curve(12) == pytest.approx(2.8)  # 0.2 a row, as from 4 to 8
    assert curve.marginal(1) == 0 and curve.marginal(5) == pytest.approx(0.2)
    linear = StepCost.linear(0.02)
    assert linear(16) == pytest.approx(1.3) and linear.marginal(40) == pytest.approx(0.02)


@pytest.mark.parametrize("rows, ms", [((1,), (1.0,)), ((2, 4), (1.0, 2.0)), ((1, 1, 2), (1.0, 1.0, 2.0)),
                                      ((1, 2), (0.0, 1.0)), ((1, 2), (1.0,))])
def test_a_malformed_curve_is_refused(rows, ms):
    with pytest.raises(ValueError, match="step cost"):
        StepCost(rows, ms, "measured")


def test_the_cache_keeps_one_curve_per_key_and_measures_only_what_it_lacks(tmp_path):
    path, calls = tmp_path / "sub" / "step_cost.json", []

    def make(ms):
        def measure():
            calls.append(ms)
            return StepCost.from_times({1: ms, 2: 2 * ms})
        return measure

    first = step_cost.cached(path, "machine a", make(5.0))
    assert step_cost.cached(path, "machine a", make(7.0)) == first and calls == [5.0]
    assert step_cost.cached(path, "machine b", make(7.0)).ms == (7.0, 14.0) and calls == [5.0, 7.0]
    assert set(json.loads(path.read_text())) == {"machine a", "machine b"}
    path.write_text("{not json")  # a damaged file is measured again and rewritten
    assert step_cost.cached(path, "machine a", make(9.0)).ms == (9.0, 18.0)
    assert json.loads(path.read_text())["machine a"]["ms"] == [9.0, 18.0]


def test_a_kept_curve_the_machine_no_longer_matches_is_measured_again(tmp_path):
    """Each start probes a few row counts; the kept curve stands while its one-row time and its
    cost of the probe's widest step stay within PROBE_TOLERANCE of the probe's."""
    path, calls = tmp_path / "step_cost.json", []
    kept = {1: 10.0, 4: 12.0, 16: 21.0}  # 16 rows 2.1x one

    def make(times):
        def measure():
            calls.append(times)
            return StepCost.from_times(times)
        return measure

    def probe(one, sixteen):
        return lambda: StepCost.from_times({1: one, 16: sixteen})

    first = step_cost.cached(path, "m", make(kept), probe(99.0, 99.0))  # nothing kept: measured, no probe read
    assert step_cost.cached(path, "m", make({1: 1.0, 2: 2.0}), probe(10.5, 23.0)) == first and calls == [kept]
    assert step_cost.cached(path, "m", make({1: 1.0, 2: 2.0}), None) == first and calls == [kept]
    today = {1: 8.3, 4: 11.9, 16: 26.5}  # the same VM on another host: a faster row, dearer rows
    for one, sixteen in ((8.3, 17.4), (10.0, 32.0)):  # the one-row time off, then only the widest step's cost
        calls.clear()
        assert step_cost.cached(path, "m", make(today), probe(one, sixteen)).ms == tuple(today.values())
        assert calls == [today] and json.loads(path.read_text())["m"]["ms"] == list(today.values())
        path.write_text(json.dumps({"m": StepCost.from_times(kept).to_json()}))


def test_the_engine_times_its_steps_once_per_machine_and_leaves_the_pools_empty(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PARAFORK_CACHE", str(tmp_path))
    llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64, block_size=4)
    curve = llm.engine.step_cost
    assert curve.source == "measured" and curve.rows == step_cost.ROWS and all(ms > 0 for ms in curve.ms)
    llm.check_idle()  # every block and sequence id back, nothing left in the prefix cache's way
    stored = json.loads((tmp_path / "step_cost.json").read_text())
    assert [entry["ms"] for entry in stored.values()] == [list(curve.ms)]
    # The next engine on this machine reads the curve instead of timing it again, where its probe
    # agrees (the tiny model's millisecond steps vary by more than PROBE_TOLERANCE between starts).
    monkeypatch.setattr(step_cost, "PROBE_TOLERANCE", float("inf"))
    again = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64, block_size=4)
    assert again.engine.step_cost == curve
    monkeypatch.setattr(step_cost, "PROBE_TOLERANCE", -1.0)  # where it never agrees: timed again and kept
    renewed = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64, block_size=4).engine.step_cost
    assert renewed != curve and json.loads((tmp_path / "step_cost.json").read_text()) == {
        next(iter(stored)): renewed.to_json()}
    renewed_again = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64, block_size=4)
    renewed_again.check_idle()  # the probe's steps give their blocks and sequence ids back too
    # 'fixed' keeps the runner's constant.
    fixed = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64, block_size=4, step_cost="fixed")
    assert fixed.engine.step_cost == StepCost.linear(fixed.engine.runner.info.draft_row_cost)


def test_a_timed_step_writes_nowhere_but_the_pool_and_gives_its_sequence_ids_back(tiny_dir):
    llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=16, block_size=4, step_cost="fixed")
    released = []
    runner = llm.engine.runner
    real_release = runner.release
    runner.release = lambda seq_id: (released.append(seq_id), real_release(seq_id))
    assert step_cost.time_steps(runner, 16, 4, rows=5, context=12, steps=1) > 0
    assert sorted(released) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("value", ["auto", -1, 2.5, True])
def test_bad_deferral_and_step_cost_settings_are_refused(tiny_dir, value):
    with pytest.raises(ValueError, match="defer_forks_from_rows"):
        LLM(str(tiny_dir), dtype="float32", defer_forks_from_rows=value)
    with pytest.raises(ValueError, match="step_cost"):
        LLM(str(tiny_dir), dtype="float32", step_cost="guessed")
