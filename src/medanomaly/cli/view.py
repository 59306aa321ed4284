"""``medanomaly view OUT``: serve a report folder on 127.0.0.1 and print its address."""

from __future__ import annotations

import argparse

from medanomaly.cli._common import at_least


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``view``."""
    p = sub.add_parser(
        "view",
        help="serve a report folder (evaluate, screen) on 127.0.0.1 for its interactive viewer",
    )
    p.add_argument("folder", help="the OUT folder of evaluate or screen (holds report.html)")
    p.add_argument("--port", type=at_least(0), default=0, help="port (default: a free one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (Ctrl-C)."""
    from medanomaly.reports.serve import report_server, report_url

    server = report_server(args.folder, args.port)
    print(f"serving {args.folder} on 127.0.0.1 only; open {report_url(server)}", flush=True)
    print("Ctrl-C stops it.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
