"""`parafork export`: a merged HF folder that other servers can serve and the driver can read."""
import pytest
from transformers import AutoTokenizer

from parafork.cli import main
from parafork.llm import LLM
from parafork.sampling import SamplingParams
from parafork.tokens import CHILD, FORK


def test_exported_folder_answers_the_same_and_servers_print_the_control_tokens(tiny_dir, tiny_llm, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--model", str(tiny_dir), "--out", str(out), "--dtype", "float32"]) == 0
    # Any server decoding with skip_special_tokens=True still prints [Fork]/[Child], and reads them back.
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode(f"a{FORK}b{CHILD}c", add_special_tokens=False)
    assert ids[1] == tiny_llm.control.fork_id and ids[3] == tiny_llm.control.child_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == f"a{FORK}b{CHILD}c"
    # parafork itself serves the exported folder as it serves the original: same forks, same text.
    exported = LLM(str(out), dtype="float32", num_kv_blocks=256, block_size=4)
    params = SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=24, logit_bias={tiny_llm.control.fork_id: 6.0})
    mine, theirs = tiny_llm.generate("List three fruits.", params)[0], exported.generate("List three fruits.", params)[0]
    assert mine.num_threads > 1 and FORK not in theirs.text and CHILD not in theirs.text
    assert (theirs.text, theirs.num_threads) == (mine.text, mine.num_threads)
    # Never over an existing folder.
    assert main(["export", "--model", str(tiny_dir), "--out", str(out)]) == 2
