"""Rollouts (model v4's data): several seeded answers per prompt, kept losslessly, resumable."""
import gzip
import json

import pytest

from parafork.cli import main
from parafork.data import rollouts
from parafork.restore import linearize

from .test_data_own import _sharegpt


def _cfg(tmp_path, tiny_dir, folder="d", **kw):
    base = dict(out=str(tmp_path / folder), prompts=2, samples=2, input=str(_sharegpt(tmp_path, 6)), model=str(tiny_dir),
                max_tokens=96, concurrency=8, num_kv_blocks=256, dtype="float32", fork_bias=6.0, pack_every=1)
    return rollouts.RolloutConfig(**{**base, **kw})


def _rows(folder):
    return [json.loads(line) for line in (folder / rollouts.FILE).read_text().splitlines()]


def test_rollouts_keep_every_sample_losslessly_resume_and_do_not_depend_on_the_batch(tiny_dir, tiny_llm, tmp_path):
    held_out = {rollouts.normalised("Give me some advice about   topic number 1.")}
    cfg = _cfg(tmp_path, tiny_dir)
    assert rollouts.generate(cfg, held_out)["this_run"] == 2
    cfg.prompts = 3
    assert rollouts.generate(cfg, held_out)["this_run"] == 1
    rows = _rows(tmp_path / "d")
    assert len({r["key"] for r in rows}) == 3 and "c1:0" not in {r["key"] for r in rows}  # the bench's prompt left out
    control = tiny_llm.control
    forked = 0
    for row in rows:
        kinds = [s["kind"] for s in row["samples"]]
        assert kinds == ["ar_greedy", "ar_sampled", "apar", "apar"]
        assert len({s["seed"] for s in row["samples"][1:]}) == 3  # each sampled answer its own seed
        for s in row["samples"]:
            tokens, complete = linearize(rollouts.TokenTree.from_json(s["tree"]), control)
            assert complete and tokens == s["token_ids"]  # the tree restores to the answer, token for token
            assert s["num_threads"] == 1 + _count_children(s["tree"])
            if s["kind"] != "apar":
                assert control.fork_id not in s["tree"]["tokens"] and s["num_threads"] == 1
        forked += sum(s["num_threads"] > 1 for s in row["samples"])
    assert forked  # the fork bias made the random model fork somewhere
    # The same prompts one at a time (another batch): every sample drawn the same.
    alone = _cfg(tmp_path, tiny_dir, "alone", prompts=3, concurrency=1)
    rollouts.generate(alone, held_out)
    assert [[s["token_ids"] for s in r["samples"]] for r in _rows(tmp_path / "alone")] == \
        [[s["token_ids"] for s in r["samples"]] for r in rows]
    # A fresh clone holds only the packed copy: it reads and resumes from it.
    (tmp_path / "d" / rollouts.FILE).unlink()
    with gzip.open(tmp_path / "d" / rollouts.PACKED, "rt") as f:
        assert len(f.read().splitlines()) == 3
    assert [r["key"] for r in rollouts.read(tmp_path / "d")] == [r["key"] for r in rows]
    assert rollouts.generate(cfg, held_out)["this_run"] == 0
    cfg.temperature = 0.9
    with pytest.raises(ValueError, match="other settings"):
        rollouts.generate(cfg, held_out)
    tiny_llm.check_idle()


def _count_children(tree):
    return sum(1 + _count_children(c) for c in tree["children"].values())


def test_rollouts_refuse_bad_settings_before_loading_a_model(tmp_path):
    with pytest.raises(ValueError, match="temperatures"):
        rollouts.RolloutConfig(out=str(tmp_path), prompts=1, temperature=0)
    with pytest.raises(SystemExit, match="top_p"):
        main(["rollouts", "--out", str(tmp_path), "--prompts", "1", "--top-p", "1.5"])
