"""Progress bars draw only on a terminal, only on global rank 0, and never with --no-progress."""

import sys

import megatron_rlhf.parallel as parallel
from megatron_rlhf.progress import progress


class FakeTTY:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_drawn_on_a_terminal_on_rank0_only(monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = progress(4, "generate", "sample")
    assert not bar.disable
    bar.update(4)
    bar.close()
    assert "generate" in tty.text and "4/4" in tty.text

    assert progress(4, "x", enable=False).disable  # --no-progress
    monkeypatch.setattr(parallel, "is_rank0", lambda: False)
    assert progress(4, "x").disable


def test_not_drawn_into_a_log_file(monkeypatch, tmp_path):
    with open(tmp_path / "log.txt", "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        bar = progress(4, "generate")
        assert bar.disable
        bar.update(4)
        bar.close()
    assert (tmp_path / "log.txt").read_text() == ""
