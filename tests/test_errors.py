"""Errors and warnings in the user's words (``fastmaml.errors``)."""
from fastmaml.errors import first_line


def test_a_warning_shows_the_cause_that_an_introducing_first_line_announces():
    inductor = RuntimeError("backend='inductor' raised:\nNotImplementedError: no storage\n\nSet ...")
    assert first_line(inductor) == (
        "backend='inductor' raised: NotImplementedError: no storage")
    assert first_line(RuntimeError("one line\nand more")) == "one line"
    assert first_line(RuntimeError("  ")) == "RuntimeError"

