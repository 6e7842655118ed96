"""A grid's progress line: cell k of N and an ETA from the cells finished so far."""

import json

from prunegrid import progress


def test_cells_are_counted_and_the_eta_comes_from_finished_cells(tmp_path, monkeypatch, capsys):
    state = tmp_path / "progress.json"
    state.write_text(json.dumps({"total": 3, "done": [], "current": None, "started": None}))
    monkeypatch.setenv(progress.ENV, str(state))
    clock = iter([1000.0, 1120.0, 1120.0, 1200.0])
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    progress.cell_started("a")
    assert "cell 1/3 a; ETA after the first cell" in capsys.readouterr().err
    progress.cell_finished("a")            # 120 s
    progress.cell_started("b")
    err = capsys.readouterr().err
    assert "cell 2/3 b" in err and "ETA 4 min" in err    # 2 cells left x 120 s
    assert json.loads(state.read_text())["done"] == [120.0]


def test_without_the_variable_nothing_is_counted(monkeypatch, capsys):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert not progress.active()
    progress.cell_started("a")
    assert capsys.readouterr().err == ""
