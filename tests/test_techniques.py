"""The taxonomy table: valid rows, every verb a real slm command with real flags, the filter and JSON output."""

from __future__ import annotations

import json
import re

import pytest

from slmkit.cli import build_parser, main
from slmkit.plan.techniques import CONSTRAINTS, STAGES, TECHNIQUES, techniques


def _subparsers(parser):
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices


def test_every_row_is_complete_and_every_constraint_is_served():
    assert len({t.name for t in TECHNIQUES}) == len(TECHNIQUES)
    for t in TECHNIQUES:
        assert t.stage in STAGES and set(t.constraints) <= set(CONSTRAINTS) and t.metric and t.verb
    assert {c for t in TECHNIQUES for c in t.constraints} == set(CONSTRAINTS)


def test_every_verb_is_a_real_command_with_real_flags():
    commands = _subparsers(build_parser())
    for t in TECHNIQUES:
        for verb in re.split(r",\s*|\s*/\s*(?=slm )", t.verb):
            words = verb.split()
            if words[0] != "slm":  # a flag every model-taking command has (--backend llamacpp)
                assert any(words[0] in p._option_string_actions for p in commands.values()), t.name
                continue
            parser = commands[words[1]]
            if words[2:3] and not words[2].startswith("-"):  # a sub-subcommand (slm cascade calibrate)
                parser = _subparsers(parser)[words[2]]
            for flag in (w for w in words if w.startswith("--")):
                assert flag in parser._option_string_actions, (t.name, flag)


def test_filter_and_json(capsys):
    assert [t.name for t in techniques("privacy")] == ["DP-SGD"]
    assert main(["techniques", "--constraint", "storage", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all("storage" in r["constraints"] for r in rows)
    assert main(["techniques"]) == 0
    assert "speculative decoding" in capsys.readouterr().out


def test_unknown_constraint_is_one_line(capsys):
    assert main(["techniques", "--constraint", "speed"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", [t.name for t in TECHNIQUES if t.search])
def test_search_knobs_are_lists_of_choices(name):
    t = next(t for t in TECHNIQUES if t.name == name)
    assert all(isinstance(v, list) and v for v in t.search.values())
