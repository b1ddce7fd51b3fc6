"""``python -m sinks.emulators <name>... [--port P]``: run emulators until interrupted.

With one name, ``--port`` is its port; with several (or ``all``) use ``--ports
'{"ga4": 8090}'`` or let each take a free port. ``--announce`` prints one JSON
line ``{name: {"url", "credentials", "env"}}`` on stdout once listening, which is
how :func:`sinks.emulators.start_all` (process mode) learns the ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys

from sinks.emulators import EMULATORS, create
from sinks.emulators.base import serve_many


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sinks.emulators")
    parser.add_argument("names", nargs="+", help=f"{', '.join(EMULATORS)} or all")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="port (single emulator only)")
    parser.add_argument("--ports", default="{}", help='JSON {"name": port}')
    parser.add_argument("--config", default="{}", help='JSON {"name": {constructor kwargs}}')
    parser.add_argument("--announce", action="store_true", help="print URLs as one JSON line")
    args = parser.parse_args(argv)

    names = list(EMULATORS) if "all" in args.names else list(dict.fromkeys(args.names))
    unknown = [n for n in names if n not in EMULATORS]
    if unknown:
        parser.error(f"unknown emulator(s): {', '.join(unknown)}")
    ports: dict[str, int] = json.loads(args.ports)
    if args.port and len(names) == 1:
        ports[names[0]] = args.port
    configs = json.loads(args.config)
    emulators = {n: create(n, configs.get(n)) for n in names}

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        async with serve_many(emulators, args.host, ports) as urls:
            announced = {
                n: {
                    "url": urls[n],
                    "credentials": e.credentials(),
                    "env": e.sink_env(urls[n]),
                }
                for n, e in emulators.items()
            }
            if args.announce:
                print(json.dumps(announced), flush=True)
            else:
                for n, url in urls.items():
                    print(f"{n}: {url}  (state: {url}/__emulator/state)", flush=True)
            await stop.wait()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
