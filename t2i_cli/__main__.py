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
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

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
        problems = [f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg')}" for item in detail if isinstance(item, dict)]
        return f"{status}: " + "; ".join(problems)
    return f"{status}: {body!r}"


async def _json(response: aiohttp.ClientResponse) -> Any:
    try:
        return await response.json(content_type=None)
    except ValueError:
        return (await response.text())[:500]


def _progress(step: int, steps: int, width: int = 30) -> None:
    filled = int(width * step / max(steps, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{steps}")
    sys.stderr.flush()


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix or '.png'}") for i in range(count)]


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
    result = None
    async with session.post(f"{gateway}/text-to-image", json=body, headers={"Accept": EVENT_STREAM}) as response:
        if response.status != 200:
            raise CommandError(error_message(response.status, await _json(response)))
        if response.content_type != EVENT_STREAM:
            result = await response.json()
        else:
            async for event, data in read_events(response.content):
                if event == "queued" and data.get("position"):
                    sys.stderr.write(f"\rqueued, {data['position']} ahead")
                elif event == "retry":
                    sys.stderr.write(f"\rretrying on another node ({data.get('reason')})\n")
                elif event == "progress":
                    _progress(data["step"], data["steps"])
                elif event == "error":
                    sys.stderr.write("\n")
                    raise CommandError(error_message(data.get("status", 0), data.get("body")))
                elif event == "result":
                    result = data
        sys.stderr.write("\n")
    if not isinstance(result, dict) or not isinstance(result.get("images"), list):
        raise CommandError("the gateway ended the answer without a result")
    for image, path in zip(result["images"], _output_paths(args.output, len(result["images"]))):
        async with session.get(image["url"]) as download:
            if download.status != 200:
                raise CommandError(f"downloading {image['url']}: " + error_message(download.status, await _json(download)))
            path.write_bytes(await download.read())
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


def parser() -> argparse.ArgumentParser:
    # The global options are taken before or after the subcommand, as people type them: the root sets
    # the defaults, and each subcommand's copy only overrides them when given (SUPPRESS).
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--gateway", default=argparse.SUPPRESS, help="gateway URL (env T2I_GATEWAY_URL)")
    shared.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env T2I_API_KEY)")
    root = argparse.ArgumentParser(prog="t2i", description="Text-to-image from the command line, through a t2i gateway.")
    root.add_argument("--gateway", default=os.environ.get("T2I_GATEWAY_URL", DEFAULT_GATEWAY), help="gateway URL (env T2I_GATEWAY_URL)")
    root.add_argument("--api-key", default=os.environ.get("T2I_API_KEY"), help="API key (env T2I_API_KEY)")
    commands = root.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", parents=[shared], help="generate images, with a progress bar, and save them")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", type=Path, default=Path("image.png"), help="file to write (with -n > 1: NAME-1.png, ...)")
    gen.add_argument("--width", type=int, default=512)
    gen.add_argument("--height", type=int, default=512)
    gen.add_argument("--steps", type=int, help="num_inference_steps (default: the model's)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--model", help="model_id (default: the gateway's)")
    gen.add_argument("--guidance", type=float, help="guidance_scale (default: the model's)")
    gen.add_argument("--negative-prompt")
    gen.add_argument("-n", type=int, default=1, help="num_images_per_prompt")
    gen.set_defaults(run=generate)
    commands.add_parser("models", parents=[shared], help="the models on offer across the network").set_defaults(run=models)
    commands.add_parser("nodes", parents=[shared], help="the orchestrators the gateway knows, as it sees them").set_defaults(run=nodes)
    return root


async def _main(args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as session:
        await args.run(session, args.gateway.rstrip("/"), args)


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
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
