"""The command line's help and output, without a server: what a newcomer reads first."""

from __future__ import annotations

import argparse

import pytest

from kvray.cluster.cli import build_parser, drain_summary, main
from tests.helpers import free_port


def subcommand(name: str) -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]


def flag_help(command: str, dest: str) -> str:
    return next(a.help for a in subcommand(command)._actions if a.dest == dest) or ""


def test_serve_model_help_lists_every_builtin_model():
    from kvray.workers.checkpoints import _builtin, builtin_models

    names = builtin_models()
    assert {"smollm2", "tiny", "tiny-qwen2", "tiny-gpt2"} <= set(names)
    assert all(_builtin(name) is not None for name in names)  # each one really is built in
    text = flag_help("serve", "model")
    assert all(name in text for name in [*names, "fake"]), text
    assert ".gguf" in text and "hub id" in text and "directory" in text


def test_every_command_has_a_one_line_description():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0]  # type: ignore[union-attr]
    lines = {a.dest: a.help for a in commands._choices_actions}
    assert set(lines) == set(commands.choices)
    assert all(lines.values()) and not any("\n" in line for line in lines.values())
    for name, command in commands.choices.items():
        assert command.description, name
        for action in command._actions:
            assert action.help, f"kvray {name} {action.dest} has no help"


def test_generate_flags_take_their_help_from_the_proto():
    temperature = flag_help("generate", "temperature")
    assert temperature == (
        "Softmax temperature; 0 means greedy. Default: the model's, else 1.0. Range [0, 100]."
    )
    assert "Repeatable" in flag_help("generate", "stop")
    help_text = " ".join(subcommand("generate").format_help().split())  # unwrapped
    assert "(INVALID_ARGUMENT naming max_tokens). This command's default: 64." in help_text
    assert "(default: None)" not in help_text


def test_generate_flags_left_out_are_not_sent():
    from kvray.wire import param_fields

    args = build_parser().parse_args(["generate", "Hi"])
    unset = {name: getattr(args, name) for name in param_fields() if name != "max_tokens"}
    assert set(unset.values()) == {None}, unset
    assert args.max_tokens == 64


def test_generate_logit_bias_flags_are_token_id_bias_pairs():
    args = build_parser().parse_args(
        ["generate", "Hi", "--logit-bias", "42=-100", "--logit-bias", "7=2.5"]
    )
    assert args.logit_bias == [(42, -100.0), (7, 2.5)]
    assert "(OpenAI's logit_bias)" in flag_help("generate", "logit_bias")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "Hi", "--logit-bias", "42"])


def test_generate_structured_output_flags_reach_the_request():
    from kvray.client.client import build_request
    from kvray.wire import param_fields

    args = build_parser().parse_args(["generate", "Hi", "--choice", "yes", "--choice", "no"])
    assert args.choice == ["yes", "no"] and args.json_object is None
    request = build_request("Hi", **{name: getattr(args, name) for name in param_fields()})
    assert list(request.sampling.choice.choices) == ["yes", "no"]
    assert "JSON schema" in flag_help("generate", "json_schema")


def test_generate_bool_flags_are_switch_pairs():
    args = build_parser().parse_args(["generate", "Hi", "--no-skip-special-tokens", "--ignore-eos"])
    assert args.skip_special_tokens is False and args.ignore_eos is True


@pytest.mark.parametrize(
    ("answer", "sentence"),
    [
        ({"drained": True, "num_streams": 0, "num_ended": 0}, "drained the router on port 8000: no stream was running"),
        ({"drained": True, "num_streams": 3, "num_ended": 0}, "drained the router on port 8000: 3 stream(s) were running, 3 finished"),
        ({"drained": True, "num_streams": 3, "num_ended": 1}, "drained the router on port 8000: 3 stream(s) were running, 2 finished; 1 ended at shutdown_timeout_s"),
        ({"drained": True}, "drained the router on port 8000"),
    ],
)  # fmt: skip
def test_drain_says_what_it_drained(answer, sentence):
    assert drain_summary(answer, 8000) == sentence


def test_drain_fails_when_no_router_answers(capsys):
    assert main(["drain", "--http-port", str(free_port()), "--timeout", "5"]) == 1
    assert "no router to drain" in capsys.readouterr().err


def test_the_demo_shows_the_servers_errors_once_each(tmp_path):
    from kvray.cluster.cli import _errors_in

    log = tmp_path / "server.log"
    log.write_text(
        "2026-12-06 10:00:00,001 INFO kvray.cluster.launcher: starting a local Ray cluster\n"
        "2026-12-06 10:00:09,002 ERROR kvray.cluster.replica_pool: replica-0: failed to start\n"
        "Traceback (most recent call last):\n"
        "OSError: no such model: '/nowhere'\n"
        "\x1b[36m(WorkerActor pid=7)\x1b[0m OSError: no such model: '/nowhere'\n"
        "OSError: no such model: '/nowhere'\n"
        "\x1b[36m(WorkerActor pid=7)\x1b[0m *** SIGABRT received ***\n"
    )
    assert _errors_in(str(log)).splitlines() == [
        "2026-12-06 10:00:09,002 ERROR kvray.cluster.replica_pool: replica-0: failed to start",
        "OSError: no such model: '/nowhere'",
    ]
