"""``ppio-emulator``: run the offline PPIO GPU API v2 prewarm emulator until SIGINT/SIGTERM.

Example::

    ppio-emulator --port 8080 --api-key my-test-key --running-seconds 10
    ppio-emulator --port 8443 --tls --tls-dir ./emulator-tls   # https; trust ./emulator-tls/ca.pem
    ppio-emulator --quota 5 --quota-counts-finished --quota-status 429   # finished tasks hold slots until deleted
    python -m airflow_provider_ppio.testing.cli --port 0
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType


def build_parser() -> argparse.ArgumentParser:
    """Describe the command-line flags.

    :return: the argument parser.
    """
    parser = argparse.ArgumentParser(
        prog="ppio-emulator",
        description="Offline emulator of the PPIO / Novita GPU API v2 image prewarm tasks (/gpus/v2/prewarm-tasks).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port; 0 picks a free one (default: %(default)s)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("PPIO_EMULATOR_API_KEY", "emulator-key"),
        help="the API key to accept as 'Authorization: Bearer <key>' "
        "(default: $PPIO_EMULATOR_API_KEY or 'emulator-key')",
    )
    parser.add_argument("--pending-seconds", type=float, default=1.0, help="time a new task stays pending")
    parser.add_argument("--running-seconds", type=float, default=3.0, help="base time a new task stays running")
    parser.add_argument("--seconds-per-gb", type=float, default=0.0, help="extra running time per GB of image size")
    parser.add_argument(
        "--fail-pattern",
        default="fail",
        help="regex searched in the image reference; a match makes the task fail ('' disables; default: %(default)s)",
    )
    parser.add_argument(
        "--quota", type=int, default=5, help="max concurrent pending/running tasks; negative = unlimited"
    )
    parser.add_argument(
        "--quota-status",
        type=int,
        default=400,
        choices=(400, 403, 429),
        help="HTTP status of a create refused over the quota, reason IMAGE_PREWARM_NUM_LIMIT (default: %(default)s)",
    )
    parser.add_argument(
        "--quota-counts-finished",
        action="store_true",
        help="finished (succeeded or failed) tasks count toward the quota until they are deleted, as PPIO's console "
        "counts created tasks",
    )
    parser.add_argument(
        "--control-token", default=None, help="require header X-Emulator-Token on /_emulator/* endpoints"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve https with a throwaway CA made at start-up; its certificate's path is printed before the URL",
    )
    parser.add_argument(
        "--tls-dir",
        default=None,
        help="with --tls, write ca.pem, cert.pem and key.pem here and keep them on exit "
        "(default: a temporary directory, removed on exit)",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator in the foreground.

    Prints ``PPIO emulator listening on <base URL>`` once it answers (with ``--tls``, preceded by
    ``PPIO emulator CA bundle: <path>``), then blocks until SIGINT or SIGTERM.

    :param argv: arguments (default: ``sys.argv[1:]``).
    :return: process exit code.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tls_dir is not None and not args.tls:
        parser.error("--tls-dir needs --tls")
    try:
        from airflow_provider_ppio.testing.emulator import EmulatorConfig
        from airflow_provider_ppio.testing.server import EmulatorServer
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        print(
            f"ppio-emulator needs FastAPI and uvicorn ({exc}); install 'airflow-provider-ppio[emulator]'",
            file=sys.stderr,
        )
        return 2
    try:
        config = EmulatorConfig(
            api_key=args.api_key,
            pending_seconds=args.pending_seconds,
            running_seconds=args.running_seconds,
            seconds_per_gb=args.seconds_per_gb,
            fail_pattern=args.fail_pattern,
            quota=None if args.quota < 0 else args.quota,
            quota_status=args.quota_status,
            quota_counts_finished=args.quota_counts_finished,
            control_token=args.control_token,
        )
    except ValueError as exc:
        print(f"ppio-emulator: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    server = EmulatorServer(
        config, host=args.host, port=args.port, log_level=args.log_level, tls=args.tls, tls_dir=args.tls_dir
    )
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
        except OSError as exc:
            print(f"ppio-emulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        if server.ca_bundle is not None:
            print(f"PPIO emulator CA bundle: {server.ca_bundle}", flush=True)
        print(f"PPIO emulator listening on {server.base_url}", flush=True)
        while not stop.wait(0.5):
            if not server.running:
                print("ppio-emulator: server thread exited unexpectedly", file=sys.stderr)
                return 1
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
