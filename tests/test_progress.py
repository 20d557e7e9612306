"""Progress bars in a log file: a few plain lines, not one line of carriage returns."""

from __future__ import annotations

from worldmodel.progress import progress_bar


def test_a_bar_in_a_log_is_a_few_plain_lines(capsys):
    for _ in progress_bar(range(10_000), desc="work", unit="step"):  # pytest's stderr is no terminal
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 2 <= len(lines) <= 3, lines  # the start, the end (and a redraw every 30 s at most)
    assert lines[-1].startswith("work: 100%") and "10000/10000" in lines[-1]


def test_a_bar_that_is_cleared_leaves_no_blank_lines(capsys):
    with progress_bar(total=5, desc="epoch", leave=False) as bar:
        bar.update(5)
    assert all(line.strip() for line in capsys.readouterr().err.splitlines())
