"""``t2i``, the command-line client, as a real process against a gateway with fake nodes."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from .fakes import FakeOrchestrator, solid_png
from .helpers import MakeGateway


async def t2i(gateway_url: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "t2i_cli",
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "T2I_GATEWAY_URL": gateway_url, **(env or {})},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_generate_shows_progress_downloads_and_prints_seeds(make_gateway: MakeGateway, tmp_path: Path) -> None:
    fake = FakeOrchestrator()
    gateway = await make_gateway(fake)
    url = str(gateway.client.make_url("")).rstrip("/")
    code, out, err = await t2i(
        url,
        "generate",
        "a cool cat on the beach",
        "-o",
        "cat.png",
        "-n",
        "2",
        "--seed",
        "9",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        cwd=tmp_path,
    )
    assert code == 0, err
    assert out.splitlines() == ["cat-1.png\tseed 9\tnsfw false", "cat-2.png\tseed 10\tnsfw false"]
    assert (tmp_path / "cat-1.png").read_bytes() == solid_png(64, 64, 1) == (tmp_path / "cat-2.png").read_bytes()
    assert "step 3/3" in err
    assert fake.requests[0]["num_inference_steps"] == 3 and fake.requests[0]["prompt"] == "a cool cat on the beach"


async def test_errors_exit_non_zero_with_the_servers_message(make_gateway: MakeGateway, tmp_path: Path) -> None:
    refusing = FakeOrchestrator()
    gateway = await make_gateway(refusing, api_keys=("k",))
    url = str(gateway.client.make_url("")).rstrip("/")
    code, _, err = await t2i(url, "generate", "a", "--width", "100", cwd=tmp_path, env={"T2I_API_KEY": "k"})
    assert code == 1 and "422" in err and "width: Must be a multiple of 8, got 100." in err
    code, _, err = await t2i(url, "generate", "a", cwd=tmp_path)
    assert code == 1 and "401" in err and "API key" in err
    refusing.mode = "refuse"
    code, _, err = await t2i(url, "--api-key", "k", "generate", "a", cwd=tmp_path)
    assert code == 1 and "fake refusal" in err
    code, _, err = await t2i("http://127.0.0.1:9", "models", cwd=tmp_path)
    assert code == 1 and "cannot reach the gateway" in err


async def test_models_and_nodes(make_gateway: MakeGateway, tmp_path: Path) -> None:
    cold = FakeOrchestrator([{"model_id": "m/warm", "pipeline": "text-to-image", "warm": False, "loaded": False}])
    gateway = await make_gateway(FakeOrchestrator(), FakeOrchestrator(), cold)
    url = str(gateway.client.make_url("")).rstrip("/")
    code, out, _ = await t2i(url, "models", cwd=tmp_path)
    assert code == 0 and out.strip() == "m/warm\twarm on 2 node(s)\tloadable on 1 more"
    code, out, _ = await t2i(url, "nodes", cwd=tmp_path)
    assert code == 0 and len(out.splitlines()) == 3 and all("healthy" in line for line in out.splitlines())
    assert sum("loadable: m/warm" in line for line in out.splitlines()) == 1


def test_global_options_are_taken_before_or_after_the_subcommand() -> None:
    from t2i_cli.__main__ import parse_args

    after = parse_args(["generate", "a cat", "--gateway", "http://host:8935", "--api-key", "k"])
    before = parse_args(["--gateway", "http://host:8935", "--api-key", "k", "generate", "a cat"])
    for args in (after, before):
        assert (args.gateway, args.api_key, args.prompt) == ("http://host:8935", "k", "a cat")
    assert parse_args(["models", "--gateway", "http://other:1"]).gateway == "http://other:1"
    assert parse_args(["nodes"]).gateway  # the default (or T2I_GATEWAY_URL) when given nowhere


def test_a_gateway_without_a_scheme_is_taken_as_http_as_curl_does(capsys: pytest.CaptureFixture[str]) -> None:
    from t2i_cli.__main__ import parse_args

    assert parse_args(["--gateway", "127.0.0.1:8935", "models"]).gateway == "http://127.0.0.1:8935"
    assert parse_args(["nodes", "--gateway", "https://gw.example/"]).gateway == "https://gw.example"
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--gateway", "ftp://gw", "models"])
    assert exit_.value.code == 2 and "'ftp://gw' is not a gateway URL such as http://127.0.0.1:8935" in capsys.readouterr().err


def test_a_misspelt_option_shows_the_subcommands_usage_and_the_closest_option(capsys: pytest.CaptureFixture[str]) -> None:
    from t2i_cli.__main__ import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["generate", "a dog", "--widht", "512"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: t2i generate ") and "unrecognized arguments: --widht 512 (did you mean --width?)" in err


def test_generate_help_gives_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from t2i_cli.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: image.png;" in help_text and help_text.count("(default: 512)") == 2 and "(default: 1)" in help_text


async def test_an_output_that_cannot_be_written_is_refused_before_generating(make_gateway: MakeGateway, tmp_path: Path) -> None:
    fake = FakeOrchestrator()
    gateway = await make_gateway(fake)
    url = str(gateway.client.make_url("")).rstrip("/")
    code, _, err = await t2i(url, "generate", "a dog", "-o", "/nonexistent/dir/x.png", cwd=tmp_path)
    assert code == 1 and err.strip() == "t2i: cannot write /nonexistent/dir/x.png: the folder /nonexistent/dir does not exist"
    code, _, err = await t2i(url, "generate", "a dog", "-o", str(tmp_path), cwd=tmp_path)
    assert code == 1 and f"cannot write {tmp_path}: it is a folder" in err
    assert fake.requests == []  # nothing was generated for an image that could not be saved


async def test_progress_off_a_terminal_is_plain_lines(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gateway = await make_gateway(FakeOrchestrator())
    url = str(gateway.client.make_url("")).rstrip("/")
    code, _, err = await t2i(url, "generate", "a dog", "--steps", "2", "--width", "64", "--height", "64", cwd=tmp_path)
    assert code == 0 and "\r" not in err and "\x1b" not in err
    assert [line for line in err.splitlines() if line.startswith("step")] == ["step 1/2", "step 2/2"]
