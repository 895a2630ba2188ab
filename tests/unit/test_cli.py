"""The command line as a newcomer types it: ``-c`` on either side of the command, a missing
config file named, usage errors told apart from invalid configuration, every problem of a
file at once, help text for every option."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import cli

VALID = "gateway:\n  id: cli-test\n  state_dir: {state}\nqueue:\n  type: redis\n"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse: --help, usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(VALID.format(state=tmp_path / "state"))
    return path


@pytest.mark.parametrize("command", [["config", "check"], ["status"], ["dlq", "list"]])
def test_config_option_after_the_command_means_the_same(
        config: Path, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    before = run(["-c", str(config), *command], capsys)
    after = run([*command, "-c", str(config)], capsys)
    long_form = run([*command, "--config", str(config)], capsys)
    assert after == before == long_form
    if command == ["config", "check"]:
        assert before[0] == 0
        assert f"# valid configuration from {config}" in before[1]


def test_run_takes_the_config_after_the_command(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingress:\n  port: nope\n")
    code, _, err = run(["run", "-c", str(bad)], capsys)
    assert code == cli.EXIT_CONFIG
    assert "ingress.port='nope'" in err and str(bad) in err


def test_a_missing_default_config_file_is_an_error_naming_the_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "etc" / "gateway.yaml"
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_PATH", str(missing))
    code, out, err = run(["config", "check"], capsys)
    assert code == cli.EXIT_CONFIG
    assert "valid configuration" not in out
    assert str(missing) in err and "no such file" in err
    code, out, _ = run(["-c", "none", "config", "check"], capsys)  # defaults, asked for
    assert code == 0 and "# valid configuration from <defaults>" in out


def test_usage_errors_exit_64_and_invalid_config_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["bogus"], ["run", "--bogus"], [], ["dlq", "replay"], ["config"]):
        code, _, err = run(argv, capsys)
        assert code == cli.EXIT_USAGE == 64, argv
        assert "usage:" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("store:\n  when_full: sometimes\n")
    assert run(["config", "check", "-c", str(bad)], capsys)[0] == cli.EXIT_CONFIG == 2


def test_every_problem_of_a_file_is_reported(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingress:\n  port: nope\n  colour: red\nstore:\n  when_full: sometimes\n"
                   "queue:\n  type: redis\n  redis_socket_timeout: soon\n")
    code, _, err = run(["config", "check", "-c", str(bad)], capsys)
    assert code == cli.EXIT_CONFIG
    for key in ("ingress.port='nope'", "ingress.colour='red'", "store.when_full='sometimes'",
                "queue.redis_socket_timeout='soon'"):
        assert key in err, err
    bad.write_text("forwarder:\n  batch_size: 0\n  max_rate: -1\n")  # two rule violations
    err = run(["config", "check", "-c", str(bad)], capsys)[2]
    assert "forwarder.batch_size=0" in err and "forwarder.max_rate=-1.0" in err


@pytest.mark.parametrize(("command", "option"), [
    (["dlq", "list"], "--limit"), (["dlq", "replay"], "--id"), (["dlq", "replay"], "--all"),
    (["dlq", "purge"], "--id"), (["status"], "--json"), (["run"], "-c"),
])
def test_every_option_has_help_text(command: list[str], option: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0
    options = out.split("options:", 1)[1]
    entry = options.split(f"  {option}", 1)[1].split("\n  -", 1)[0]
    words = entry.split(None, 1)  # the metavar (if any), then the help text
    assert len(" ".join(words).replace(option, "").split()) >= 3, f"{option}: {entry!r}"


def test_run_says_in_one_line_when_the_state_dir_is_unusable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = tmp_path / "gateway.yaml"
    config.write_text(VALID.format(state=blocker / "state"))
    code, _, err = run(["run", "-c", str(config)], capsys)
    assert code == 1
    assert err.startswith(f"error: cannot keep the store in {blocker / 'state'}")
    assert "gateway.state_dir" in err and "Traceback" not in err
