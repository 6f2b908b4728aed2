"""Errors and warnings in the user's words (``fastmaml.errors``)."""
from fastmaml.errors import first_line


def test_a_warning_shows_the_cause_that_an_introducing_first_line_announces():
    inductor = RuntimeError("backend='inductor' raised:\nNotImplementedError: no storage\n\nSet ...")
    assert first_line(inductor) == (
        "backend='inductor' raised: NotImplementedError: no storage")
    assert first_line(RuntimeError("one line\nand more")) == "one line"
    assert first_line(RuntimeError("  ")) == "RuntimeError"



def test_another_librarys_coloured_warning_is_shown_plain_off_a_terminal(capsys) -> None:
    """gymnasium colours its warnings: in a log file the colours were escape codes."""
    from fastmaml.cli import _show_warning

    shown = []
    _show_warning("\x1b[33mWARN: the obs returned is not within the space\x1b[0m", UserWarning,
                  "env.py", 1, others=lambda message, *_: shown.append(message))
    assert shown == ["WARN: the obs returned is not within the space"]  # (stderr: captured)
