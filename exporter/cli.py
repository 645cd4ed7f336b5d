"""Command line: ``dcs-migration-exporter`` / ``python -m exporter``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from exporter import __version__, redis_demo
from exporter.client import ApiError
from exporter.config import (
    AkSkAuth,
    CloudConfig,
    Config,
    ConfigError,
    PollingConfig,
    Secret,
    TaskConfig,
    load_config,
)
from exporter.daemon import Daemon, build_poller
from exporter.discovery import merge, select
from exporter.logs import LEVELS, log_each_line, setup_logging
from exporter.poller import Poller
from exporter.session import open_session
from exporter.sharding import Shard, parse_shard
from exporter.state import ExporterState
from exporter.web import MetricsRenderer
from exporter.web_config import WebConfig, WebConfigError, load_web_config

log = logging.getLogger("exporter")

DEFAULT_LISTEN = ":9713"
DEFAULT_CONFIG_FILE = "config.yaml"


def parse_listen_address(value: str) -> tuple[str | None, int]:
    """``HOST:PORT``, ``:PORT`` (all interfaces) or ``[::1]:PORT``."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    host = host.strip("[]")
    return (host or None), int(port_text)


def shard_argument(value: str) -> Shard:
    """``--shard``: see exporter.sharding."""
    try:
        return parse_shard(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The flags of DESIGN.md, named as in other Prometheus exporters."""
    parser = argparse.ArgumentParser(
        prog="dcs-migration-exporter",
        description="Export the progress of DCS online migration tasks to Prometheus.",
        epilog="'dcs-migration-exporter status --help': the tasks in a terminal, one line each.",
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        default=None,
        metavar="PATH",
        help=f"YAML config (default {DEFAULT_CONFIG_FILE})",
    )
    parser.add_argument(
        "--config.check",
        dest="config_check",
        action="store_true",
        help="validate the config, print every problem, exit 0 or 1",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen",
        default=DEFAULT_LISTEN,
        type=parse_listen_address,
        metavar="HOST:PORT",
        help=f"where the pages are served (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default=None,
        metavar="PATH",
        help="TLS and basic auth, exporter-toolkit format",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="poll every task once, print the metrics, exit 1 if any poll failed",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run the bundled DCS API simulator on loopback and export its tasks",
    )
    parser.add_argument(
        "--shard",
        type=shard_argument,
        default=None,
        metavar="INDEX/COUNT",
        help="poll only this replica's share of the tasks: 0-based INDEX of COUNT replicas, or "
        "auto/COUNT to take INDEX from the host name's -K suffix (StatefulSet pod ordinal)",
    )
    parser.add_argument("--log.level", dest="log_level", default="info", choices=LEVELS)
    parser.add_argument(
        "--log.format", dest="log_format", default="logfmt", choices=("logfmt", "json")
    )
    parser.add_argument(
        "--version", action="version", version=f"dcs-migration-exporter {__version__}"
    )
    redis_demo.add_arguments(parser)
    return parser


def demo_config(base_url: str, task_ids: Sequence[tuple[str, str]]) -> Config:
    """A config pointing at a simulator with its demo credentials."""
    from exporter.simulator import DEMO_ACCESS_KEY, DEMO_PROJECT_ID, DEMO_SECRET_KEY

    return Config(
        cloud=CloudConfig(
            region="eu-de",
            dcs_endpoint=base_url,
            iam_endpoint=f"{base_url}/v3",
            project_id=DEMO_PROJECT_ID,
        ),
        auth=AkSkAuth(access_key=DEMO_ACCESS_KEY, secret_key=Secret(value=DEMO_SECRET_KEY)),
        polling=PollingConfig(interval=5.0, timeout=4.0, details_interval=30.0),
        tasks=tuple(TaskConfig(id=task_id, name=name) for task_id, name in task_ids),
    )


async def run_once(config: Config, shard: Shard | None = None) -> int:
    """Poll every task (configured or discovered, of the shard) of every target once and print
    the exposition; 1 if a poll or a target's listing failed."""
    state = ExporterState()
    ok = True
    async with open_session(config) as session:
        pollers: list[Poller] = []
        for target in config.targets:
            poller = build_poller(config, session, state, (), target=target, owned=())
            tasks = target.tasks
            if target.discovery is not None:
                try:
                    found = select(await poller.client.list_tasks(), target.discovery)
                except ApiError as error:
                    log.error(
                        "target %s: discovery: listing the tasks failed: %s", target.name, error
                    )
                    ok = False
                    found = ()
                taken = {task_id.lower() for other in pollers for task_id in other.task_ids}
                taken.update(task.id.lower() for task in config.all_tasks)
                tasks = merge(tasks, (task for task in found if task.id.lower() not in taken))
            poller.set_tasks(shard.select(tasks) if shard is not None else tasks)
            pollers.append(poller)
        results = await asyncio.gather(*(poller.poll_all_once() for poller in pollers))
    sys.stdout.write(MetricsRenderer(state).render(openmetrics=False).decode())
    return 0 if ok and all(results) else 1


async def run_demo(listen: tuple[str | None, int], web_config: WebConfig | None) -> None:
    """Start the simulator on loopback and the daemon against it."""
    from exporter.simulator import DEMO_TASKS, demo_simulator, start

    simulator = demo_simulator()
    runner, base_url = await start(simulator)
    log.info("demo: DCS API simulator on %s with %d tasks", base_url, len(DEMO_TASKS))
    try:
        daemon = Daemon(demo_config(base_url, DEMO_TASKS), None, web_config)
        await daemon.serve(*listen)
    finally:
        await runner.cleanup()


def format_listen_address(listen: tuple[str | None, int]) -> str:
    """``HOST:PORT`` as a user would write it (``[::1]:9713``, ``:9713`` for all interfaces)."""
    host, port = listen
    if host and ":" in host:
        return f"[{host}]:{port}"
    return f"{host or ''}:{port}"


def check_config(args: argparse.Namespace) -> int:
    """``--config.check``: the config and, when given, the web config; every problem printed."""
    failed = False
    try:
        config = load_config(args.config_file)
        count, targets = len(config.all_tasks), len(config.targets)
        in_targets = f" in {targets} targets" if targets > 1 else ""
        discovering = any(target.discovery is not None for target in config.targets)
        found = " (more found by discovery at run time)" if discovering else ""
        print(f"{args.config_file}: OK, {count} task{'' if count == 1 else 's'}{in_targets}{found}")
    except ConfigError as error:
        print(error, file=sys.stderr)
        failed = True
    if args.web_config_file:
        try:
            load_web_config(args.web_config_file)
            print(f"{args.web_config_file}: OK")
        except WebConfigError as error:
            print(error, file=sys.stderr)
            failed = True
    return 1 if failed else 0


async def run_demo_once() -> int:
    """``--demo --once``: poll the simulator's tasks once and print the exposition."""
    from exporter.simulator import DEMO_TASKS, demo_simulator, start

    runner, base_url = await start(demo_simulator())
    try:
        return await run_once(demo_config(base_url, DEMO_TASKS))
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:
        from exporter.status import main as status_main

        return status_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    given_config_file = args.config_file is not None
    args.config_file = args.config_file or DEFAULT_CONFIG_FILE
    if args.config_check:
        return check_config(args)
    try:
        return _run(args, given_config_file)
    except KeyboardInterrupt:
        # Ctrl-C in the foreground (--once, or before the signal handlers are in place).
        return 130
    except OSError as error:
        if error.filename is not None:  # a file (a secret, say) that went away since the check
            log.error("cannot read %s: %s", error.filename, error.strerror)
        else:
            log.error("cannot serve on %s: %s", format_listen_address(args.listen), error.strerror)
        return 1


def _run(args: argparse.Namespace, given_config_file: bool) -> int:
    """Start what the flags ask for."""
    try:
        web_config = load_web_config(args.web_config_file) if args.web_config_file else None
        if args.demo_redis or args.demo:
            if given_config_file:
                log.warning("--config.file %s is ignored in demo mode", args.config_file)
            if args.demo_redis:
                return redis_demo.run_cli(args, web_config)
            if args.once:
                return asyncio.run(run_demo_once())
            asyncio.run(run_demo(args.listen, web_config))
            return 0
        config = load_config(args.config_file)
    except (ConfigError, WebConfigError) as error:
        log_each_line(log, logging.ERROR, "cannot start: invalid configuration", str(error))
        return 1
    if args.once:
        return asyncio.run(run_once(config, args.shard))
    daemon = Daemon(config, lambda: load_config(args.config_file), web_config, shard=args.shard)
    asyncio.run(daemon.serve(*args.listen))
    return 0
