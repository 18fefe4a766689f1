"""Durations as users write them and as the kit prints them."""

import pytest

from lowres_ssl.durations import format_duration, parse_budget
from lowres_ssl.errors import UserError


def test_parse_budget_and_its_errors():
    assert parse_budget("15m") == 900 and parse_budget("2h") == 7200
    assert parse_budget("1h30m") == 5400 and parse_budget("90s") == 90
    assert parse_budget(300) == 300 and parse_budget("300") == 300
    for bad in ("soon", "15 parsecs", "-5", 0, "m"):
        with pytest.raises(UserError, match="time_budget"):
            parse_budget(bad)
    assert format_duration(45) == "45 s" and format_duration(900) == "15 min"
    assert format_duration(281) == "4 min 41 s" and format_duration(7500) == "2 h 5 min"
