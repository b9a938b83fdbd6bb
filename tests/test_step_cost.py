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


def test_the_engine_times_its_steps_once_per_machine_and_leaves_the_pools_empty(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PARAFORK_CACHE", str(tmp_path))
    llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64, block_size=4)
    curve = llm.engine.step_cost
    assert curve.source == "measured" and curve.rows == step_cost.ROWS and all(ms > 0 for ms in curve.ms)
    llm.check_idle()  # every block and sequence id back, nothing left in the prefix cache's way
    stored = json.loads((tmp_path / "step_cost.json").read_text())
    assert [entry["ms"] for entry in stored.values()] == [list(curve.ms)]
    # The next engine on this machine reads the curve instead of timing it again.
    again = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64, block_size=4)
    assert again.engine.step_cost == curve
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
