"""The command line is consistent (issue 12 §3): help text on every command and option,
defaults shown, one spelling per concept (old spellings hidden but accepted), documented
exit statuses that match what happens, and the defaults scripts rely on."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from sealedtorch.cli import EXIT_CODES, HelpFormatter, build_parser, iter_parsers, main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _options() -> list[tuple[str, argparse.Action]]:
    out = []
    for path, parser in iter_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction |
                          argparse._VersionAction):
                continue
            out.append((" ".join(path), action))
    return out


def test_every_command_has_help_text():
    missing = []
    for path, parser in iter_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{' '.join(path)} {a.dest}" for a in action._choices_actions
                            if not a.help]
    assert missing == []


def test_every_option_and_argument_has_help_text():
    missing = [f"{cmd} {a.option_strings or a.dest}" for cmd, a in _options() if not a.help]
    assert missing == []


def test_every_command_formats_its_help_with_defaults_shown():
    assert {type(p).__name__ for _, p in iter_parsers(build_parser())} == {"Parser"}
    assert all(p.formatter_class is HelpFormatter for _, p in iter_parsers(build_parser()))


def test_every_meaningful_default_is_shown_in_help():
    formatter = HelpFormatter("sealedtorch")
    hidden = []
    for cmd, action in _options():
        if action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        if action.default in (None, False, [], argparse.SUPPRESS):
            continue
        text = formatter._get_help_string(action) or ""
        if "default" not in text.lower():
            hidden.append(f"{cmd} {action.option_strings}")
    assert hidden == []


def test_help_shows_the_rendered_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    assert "127.0.0.1:9443" in " ".join(capsys.readouterr().out.split())


def test_old_spellings_are_hidden_from_help():
    visible = {flag for _, a in _options() if a.help != argparse.SUPPRESS
               for flag in a.option_strings}
    assert not visible & {"--sim-root", "--out"}
    trust = {flag for _, a in _options() if a.help != argparse.SUPPRESS
             for flag in a.option_strings if "sim-root" in flag}
    assert trust == {"--trust-sim-root"}


@pytest.mark.parametrize("old, new", [
    (["attest", "verify", "--tee", "sim", "--evidence", "e", "--sim-root", "p.pub"],
     ["attest", "verify", "--tee", "sim", "--evidence", "e", "--trust-sim-root", "p.pub"]),
    (["client", "infer", "--url", "https://h:1", "--policy", "p", "--model", "m", "--input",
      "x.npy", "--sim-root", "p.pub"],
     ["client", "infer", "--url", "https://h:1", "--policy", "p", "--model", "m", "--input",
      "x.npy", "--trust-sim-root", "p.pub"]),
    (["sim", "init", "--out", "d"], ["sim", "init", "--output", "d"]),
    (["keyserver", "audit", "list", "--data", "d", "--model", "m"],
     ["keyserver", "audit", "list", "--data", "d", "--model-id", "m"]),
])
def test_old_spellings_still_parse_to_the_same_arguments(old, new):
    parser = build_parser()
    as_old, as_new = vars(parser.parse_args(old)), vars(parser.parse_args(new))
    as_old.pop("handler"), as_new.pop("handler")
    assert as_old == as_new


def test_serve_honours_the_keycache_socket_variable(monkeypatch):
    monkeypatch.setenv("SEALEDTORCH_KEYCACHE_SOCKET", "/tmp/st-elsewhere.sock")
    args = build_parser().parse_args(["serve", "--model", "m=x.sealed"])
    assert args.keycache == "/tmp/st-elsewhere.sock"
    kc = build_parser().parse_args(["keycache", "status"])
    assert kc.socket == args.keycache


def test_keyserver_and_serve_do_not_share_a_default_port():
    parser = build_parser()
    ks = parser.parse_args(["keyserver", "run", "--data", "d"]).listen
    rt = parser.parse_args(["serve"]).listen
    assert ks.rpartition(":")[2] != rt.rpartition(":")[2]


def _documented_exit_codes() -> dict[int, str]:
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", DOCS.read_text(), flags=re.M)
    return {int(code): text for code, text in rows}


def test_documented_exit_codes_are_the_ones_the_cli_defines():
    assert set(_documented_exit_codes()) == set(EXIT_CODES)


@pytest.fixture
def sim_evidence(tmp_path: Path) -> Path:
    from sealedtorch.attest.sim import init_platform

    platform = init_platform(tmp_path / "sim")
    ev = platform.sign_evidence(bytes(64), measurement=bytes(48))
    (tmp_path / "ev.bin").write_bytes(ev.data)
    (tmp_path / "deny.json").write_text(json.dumps(
        {"allow": [{"tee": "sim", "measurement": "11" * 48}]}))
    (tmp_path / "allow.json").write_text(json.dumps(
        {"allow": [{"tee": "sim", "measurement": "00" * 48}]}))
    return tmp_path


@pytest.mark.parametrize("argv, status", [
    (["attest", "verify", "--tee", "sim", "--evidence", "{d}/ev.bin", "--trust-sim-root",
      "{d}/sim/platform.pub", "--policy", "{d}/allow.json"], 0),
    (["attest", "verify", "--tee", "sim", "--evidence", "{d}/ev.bin", "--trust-sim-root",
      "{d}/sim/platform.pub", "--policy", "{d}/deny.json"], 1),
    (["attest", "verify", "--tee", "sim", "--evidence", "{d}/ev.bin"], 2),
    (["inspect", "{d}/missing.sealed"], 2),
    (["keycache", "status", "--socket", "{d}/none.sock"], 2),
])
def test_exit_statuses_match_the_documented_table(sim_evidence, argv, status, capsys):
    assert status in _documented_exit_codes()
    assert main([a.format(d=sim_evidence) for a in argv]) == status
    err = capsys.readouterr().err
    if status:
        assert len(err.strip().splitlines()) <= 1 and "Traceback" not in err


def test_a_usage_error_exits_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["seal", "--no-such-option"])
    assert exit_info.value.code == 2 and 2 in _documented_exit_codes()
