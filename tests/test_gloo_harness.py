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
