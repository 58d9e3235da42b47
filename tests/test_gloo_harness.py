"""The rank launcher of the gloo tests (`tests/gloo.py`) exits early only after a rank's work:
a rank that dies before it writes its output still fails the test, named, with the Python frame
faulthandler saw."""

from __future__ import annotations

import pytest

from tests.gloo import LEAVE, run_ranks

SCRIPT = (
    """
import os, sys
rank, out = int(sys.argv[1]), sys.argv[2]
if rank == 1:
    os.abort()  # a native crash mid-run
open(out, "w").write("done")
"""
    + LEAVE
)


@pytest.mark.subprocess
def test_a_rank_that_crashes_before_its_output_fails_named_with_its_frame(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    outs = [tmp_path / f"r{r}.txt" for r in (0, 1)]
    with pytest.raises(AssertionError) as e:
        run_ranks(script, [[str(r), str(out)] for r, out in enumerate(outs)], timeout=60)
    assert "rank 1 exited -6" in str(e.value)
    assert "Fatal Python error: Aborted" in str(e.value) and "ranks.py" in str(e.value)
    assert outs[0].read_text() == "done" and not outs[1].exists()  # rank 0 left cleanly


CHATTY = """
import os, sys, time
rank, flag = int(sys.argv[1]), sys.argv[2]
if rank == 1:
    sys.stdout.write("x" * (1 << 20))  # far more than a pipe buffer holds
    sys.stdout.flush()
    open(flag, "w").close()
else:  # rank 0 finishes only after rank 1 has written everything
    deadline = time.time() + 30
    while not os.path.exists(flag) and time.time() < deadline:
        time.sleep(0.05)
    sys.exit(0 if os.path.exists(flag) else 3)
"""


@pytest.mark.subprocess
def test_a_rank_that_prints_a_lot_does_not_block_the_others(tmp_path):
    """Rank 0 waits for rank 1, which first prints 1 MiB: with output on pipes read one rank
    at a time rank 1 would block on the full pipe and rank 0 would time out (exit 3)."""
    script = tmp_path / "chatty.py"
    script.write_text(CHATTY)
    flag = str(tmp_path / "flag")
    run_ranks(script, [["0", flag], ["1", flag]], timeout=60)
