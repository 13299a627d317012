"""``t2i generate | models | nodes``: talk to a gateway from the command line.

    t2i generate "a cool cat on the beach" -o cat.png
    t2i models
    t2i nodes

The gateway comes from ``--gateway`` or ``T2I_GATEWAY_URL`` (default http://127.0.0.1:8935), the API key
from ``--api-key`` or ``T2I_API_KEY``.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from t2i_common.errors import join_problems
from t2i_common.sse import EVENT_STREAM, read_events

DEFAULT_GATEWAY = "http://127.0.0.1:8935"


class CommandError(Exception):
    """What went wrong, in words for the person at the terminal."""


def error_message(status: int, body: Any) -> str:
    """The server's own message from a Livepeer-shaped error body."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, dict) and "msg" in detail:
        return f"{status}: {detail['msg']}"
    if isinstance(detail, list):
        problems = [(".".join(str(p) for p in item.get("loc", [])[1:]), str(item.get("msg"))) for item in detail if isinstance(item, dict)]
        return f"{status}: {join_problems(problems)}"
    return f"{status}: {body!r}"


async def _json(response: aiohttp.ClientResponse) -> Any:
    try:
        return await response.json(content_type=None)
    except ValueError:
        return (await response.text())[:500]


class Status:
    """Progress on stderr: a bar redrawn in place on a terminal, plain lines anywhere else (a log, a pipe)."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self._open = False  # a line redrawn in place that still needs its newline

    def update(self, text: str) -> None:
        if self.live:
            sys.stderr.write(f"\r{text}\x1b[K")
            self._open = True
        else:
            sys.stderr.write(f"{text}\n")
        sys.stderr.flush()

    def line(self, text: str) -> None:
        self.end()
        sys.stderr.write(f"{text}\n")

    def progress(self, step: int, steps: int, width: int = 30) -> None:
        filled = int(width * step / max(steps, 1))
        self.update(f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{steps}" if self.live else f"step {step}/{steps}")

    def end(self) -> None:
        if self._open:
            sys.stderr.write("\n")
            self._open = False


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix or '.png'}") for i in range(count)]


def check_writable(paths: list[Path]) -> None:
    """Refuse before generating (which may take minutes) if the images could not be saved."""
    for path in paths:
        folder = path.parent
        if path.is_dir():
            raise CommandError(f"cannot write {path}: it is a folder; give a file name, such as {path / 'image.png'}")
        if not folder.is_dir():
            raise CommandError(f"cannot write {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise CommandError(f"cannot write {path}: permission denied")


def _save(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None


async def generate(session: aiohttp.ClientSession, gateway: str, args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"prompt": args.prompt, "width": args.width, "height": args.height, "num_images_per_prompt": args.n}
    optional = {
        "model_id": args.model,
        "seed": args.seed,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "negative_prompt": args.negative_prompt,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    paths = _output_paths(args.output, args.n)
    check_writable(paths)
    status = Status()
    result = None
    async with session.post(f"{gateway}/text-to-image", json=body, headers={"Accept": EVENT_STREAM}) as response:
        if response.status != 200:
            raise CommandError(error_message(response.status, await _json(response)))
        if response.content_type != EVENT_STREAM:
            result = await response.json()
        else:
            async for event, data in read_events(response.content):
                if event == "queued" and data.get("position"):
                    status.update(f"queued, {data['position']} ahead")
                elif event == "retry":
                    status.line(f"retrying on another node ({data.get('reason')})")
                elif event == "progress":
                    status.progress(data["step"], data["steps"])
                elif event == "error":
                    status.end()
                    raise CommandError(error_message(data.get("status", 0), data.get("body")))
                elif event == "result":
                    result = data
        status.end()
    if not isinstance(result, dict) or not isinstance(result.get("images"), list):
        raise CommandError("the gateway ended the answer without a result")
    for image, path in zip(result["images"], paths):
        async with session.get(image["url"]) as download:
            if download.status != 200:
                raise CommandError(f"downloading {image['url']}: " + error_message(download.status, await _json(download)))
            data = await download.read()
        await asyncio.to_thread(_save, path, data)
        print(f"{path}\tseed {image['seed']}\tnsfw {str(image['nsfw']).lower()}")


async def _get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        if response.status != 200:
            raise CommandError(error_message(response.status, await _json(response)))
        return await response.json()


async def models(session: aiohttp.ClientSession, gateway: str, args: argparse.Namespace) -> None:
    listing = (await _get(session, f"{gateway}/models"))["models"]
    if not listing:
        print("no models on offer (no orchestrator has been seen yet)")
    for model in listing:
        print(f"{model['model_id']}\twarm on {model['warm_nodes']} node(s)\tloadable on {model['loadable_nodes']} more")


async def nodes(session: aiohttp.ClientSession, gateway: str, args: argparse.Namespace) -> None:
    for node in (await _get(session, f"{gateway}/orchestrators"))["orchestrators"]:
        state = "healthy" if node["healthy"] else f"down ({node['last_error'] or 'not ready'})"
        latency = f"{node['latency_s']:.2f} s" if node["latency_s"] is not None else "-"
        print(
            f"{node['url']}\t{state}\tfree {node['free']}/{node['capacity']}\tin flight {node['in_flight']}\t"
            f"latency {latency}\twarm: {', '.join(node['models_warm']) or '-'}\tloadable: {', '.join(node['models_loadable']) or '-'}"
        )


def gateway_url(text: str) -> str:
    """The gateway's base URL; an address without a scheme is taken as http, as curl does."""
    url = text.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest:
        raise argparse.ArgumentTypeError(f"{text!r} is not a gateway URL such as http://127.0.0.1:8935")
    return url


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The root parser, and each subcommand's own (to show its usage when its options are wrong)."""
    # The global options are taken before or after the subcommand, as people type them: the root sets
    # the defaults, and each subcommand's copy only overrides them when given (SUPPRESS).
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--gateway", type=gateway_url, default=argparse.SUPPRESS, help="gateway URL (env T2I_GATEWAY_URL)")
    shared.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env T2I_API_KEY)")
    root = argparse.ArgumentParser(prog="t2i", description="Text-to-image from the command line, through a t2i gateway.")
    root.add_argument(
        "--gateway",
        type=gateway_url,
        default=os.environ.get("T2I_GATEWAY_URL", DEFAULT_GATEWAY),
        help=f"gateway URL (env T2I_GATEWAY_URL; default {DEFAULT_GATEWAY})",
    )
    root.add_argument("--api-key", default=os.environ.get("T2I_API_KEY"), help="API key (env T2I_API_KEY)")
    commands = root.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", parents=[shared], help="generate images, with a progress bar, and save them")
    gen.add_argument("prompt")
    gen.add_argument(
        "-o", "--output", type=Path, default=Path("image.png"), help="file to write (default: %(default)s; with -n > 1: NAME-1.png, ...)"
    )
    gen.add_argument("--width", type=int, default=512, help="pixels, a multiple of 8 (default: %(default)s)")
    gen.add_argument("--height", type=int, default=512, help="pixels, a multiple of 8 (default: %(default)s)")
    gen.add_argument("--steps", type=int, help="num_inference_steps (default: the model's)")
    gen.add_argument("--seed", type=int, help="(default: random)")
    gen.add_argument("--model", help="model_id (default: the gateway's)")
    gen.add_argument("--guidance", type=float, help="guidance_scale (default: the model's)")
    gen.add_argument("--negative-prompt")
    gen.add_argument("-n", type=int, default=1, help="num_images_per_prompt (default: %(default)s)")
    gen.set_defaults(run=generate)
    listing = commands.add_parser("models", parents=[shared], help="the models on offer across the network")
    listing.set_defaults(run=models)
    fleet = commands.add_parser("nodes", parents=[shared], help="the orchestrators the gateway knows, as it sees them")
    fleet.set_defaults(run=nodes)
    return root, {"generate": gen, "models": listing, "nodes": fleet}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; an unknown option is reported with its subcommand's usage and the closest option's name."""
    root, subcommands = parser()
    args, unknown = root.parse_known_args(argv)
    if unknown:
        culprit = subcommands[args.command]
        options = [option for action in culprit._actions for option in action.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=")[0], options, n=1)
        culprit.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {close[0]}?)" if close else ""))
    return args


async def _main(args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as session:
        await args.run(session, args.gateway, args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        asyncio.run(_main(args))
    except CommandError as exc:
        sys.exit(f"t2i: {exc}")
    except (aiohttp.ClientError, OSError) as exc:
        sys.exit(f"t2i: cannot reach the gateway at {args.gateway}: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
