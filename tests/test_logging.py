"""featlearn._logging: where messages go, and when they are emitted."""

import logging

import pytest

from featlearn._logging import log, logger, progress


def test_levels_and_default_stderr(capsys):
    log(0, "silent")
    log(1, "stage line")
    log(1, "iteration line", level=2)
    log(2, "detail line", level=2)
    err = capsys.readouterr().err
    assert "silent" not in err and "iteration line" not in err
    assert "featlearn: stage line\n" in err and "featlearn: detail line\n" in err


def test_another_handler_does_not_silence_the_default(capsys):
    records = []
    extra = logging.Handler()
    extra.emit = records.append
    logger.addHandler(extra)
    try:
        log(1, "both")
    finally:
        logger.removeHandler(extra)
    assert "featlearn: both" in capsys.readouterr().err
    assert [r.getMessage() for r in records] == ["both"]


def test_propagating_to_the_application_replaces_the_default(capsys, caplog):
    logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="featlearn"):
            log(1, "routed")
    finally:
        logger.propagate = False
    assert "routed" not in capsys.readouterr().err
    assert "routed" in caplog.text


@pytest.mark.parametrize("verbose", [0, 1])
def test_progress_bar_only_when_verbose(capsys, verbose):
    with progress(3, desc="stage", verbose=verbose) as bar:
        bar.update(3)
    err = capsys.readouterr().err
    assert ("stage" in err and "3/3" in err) == bool(verbose)
