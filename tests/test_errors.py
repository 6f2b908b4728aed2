"""Errors and warnings in the user's words (``fastmaml.errors``)."""
import pytest

from fastmaml.errors import a, first_line


def test_a_warning_shows_the_cause_that_an_introducing_first_line_announces():
    inductor = RuntimeError("backend='inductor' raised:\nNotImplementedError: no storage\n\nSet ...")
    assert first_line(inductor) == (
        "backend='inductor' raised: NotImplementedError: no storage")
    assert first_line(RuntimeError("one line\nand more")) == "one line"
    assert first_line(RuntimeError("  ")) == "RuntimeError"


@pytest.mark.parametrize("noun, said", [("omniglot-5w1s", "an omniglot-5w1s"),
                                        ("Omniglot", "an Omniglot"),
                                        ("sinusoid-demo", "a sinusoid-demo")])
def test_a_noun_takes_the_article_its_first_letter_calls_for(noun: str, said: str) -> None:
    assert a(noun) == said
