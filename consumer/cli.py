"""`emotion-worker`: run the worker, publish frame events, run the demo, make a tiny model."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from consumer.config import ConfigError, WorkerSettings, flag_overrides, load_settings
from consumer.dashboard.command import add_dashboard_parser
from consumer.replay.command import add_replay_parser
from consumer.summarize.command import add_summarize_parser, summarize_overrides

if TYPE_CHECKING:  # the run path imports these lazily: `--help` must not load torch
    from consumer.ops.metrics import HealthState, WorkerMetrics

# Flag -> (section, field) of WorkerSettings; flags beat the environment and the file.
_RUN_FLAGS: dict[str, tuple[str, str]] = {
    "bootstrap_servers": ("kafka", "bootstrap_servers"),
    "group_id": ("kafka", "group_id"),
    "input_topic": ("kafka", "input_topic"),
    "output_topic": ("kafka", "output_topic"),
    "dead_letter_topic": ("kafka", "dead_letter_topic"),
    "model_path": ("model", "path"),
    "device": ("model", "device"),
    "max_batch_size": ("batch", "max_batch_size"),
    "max_wait_ms": ("batch", "max_wait_ms"),
    "log_format": ("log", "format"),
    "log_level": ("log", "level"),
}
_SECRET_WORDS = ("password", "secret", "token", "key.pem", "sasl.oauthbearer.config")


def overrides_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The nested settings dict of the flags that were given."""
    return flag_overrides(args, _RUN_FLAGS)


def masked_settings(settings: WorkerSettings) -> dict[str, Any]:
    """The effective settings for the start-up log line, secrets replaced by '***'."""

    def mask(value: Any, name: str = "") -> Any:
        if isinstance(value, dict):
            return {k: mask(v, str(k)) for k, v in value.items()}
        if any(word in name.lower() for word in _SECRET_WORDS):
            return "***"
        return value

    return dict(mask(settings.model_dump(mode="json")))


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (see README)")
    parser.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    parser.add_argument("--group-id", dest="group_id")
    parser.add_argument("--input-topic", dest="input_topic")
    parser.add_argument("--output-topic", dest="output_topic")
    parser.add_argument("--dead-letter-topic", dest="dead_letter_topic")
    parser.add_argument(
        "--model-path",
        dest="model_path",
        type=Path,
        help="local LLaVA checkpoint folder (Hugging Face layout)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-batch-size", dest="max_batch_size", type=int)
    parser.add_argument("--max-wait-ms", dest="max_wait_ms", type=float)
    parser.add_argument("--log-format", dest="log_format", choices=["auto", "json", "console"])
    parser.add_argument(
        "--log-level", dest="log_level", choices=["debug", "info", "warning", "error"]
    )


class _VersionAction(argparse.Action):
    """`--version`: read from package metadata only when asked (no torch import)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        from consumer.preflight import version_text

        print(version_text())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotion-worker", description=__doc__)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="consume frame events and publish emotion results")
    _add_run_flags(run)

    check = sub.add_parser(
        "check", help="preflight: try the config against the brokers, topics and model (no writes)"
    )
    _add_run_flags(check)
    check.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per broker call (default 10)"
    )
    check.add_argument("--skip-model", action="store_true", help="do not load the model")

    produce = sub.add_parser("produce", help="publish a frame event for every image in a folder")
    produce.add_argument("folder", type=Path)
    produce.add_argument(
        "--config",
        type=Path,
        help="the worker's TOML config: its Kafka settings and security, and its input topic",
    )
    produce.add_argument(
        "--bootstrap-servers",
        dest="bootstrap_servers",
        help="beats kafka.bootstrap_servers of --config and the environment",
    )
    produce.add_argument("--topic", default=None, help="default: kafka.input_topic (frames)")
    produce.add_argument(
        "--inline",
        action="store_true",
        help="send each image inside its event as a data: URI instead of a file:// path",
    )
    produce.add_argument(
        "--stream-id",
        default=None,
        help="stream id of every event (default: the image's folder name)",
    )
    produce.add_argument("--limit", type=int, default=None, help="at most this many images")
    produce.add_argument(
        "--create-topic",
        type=int,
        metavar="PARTITIONS",
        default=None,
        help="create the topic with this many partitions if it is missing",
    )

    add_replay_parser(sub)
    add_summarize_parser(sub)
    add_dashboard_parser(sub)

    demo = sub.add_parser(
        "demo", help="local broker + the shipped FER model + held-out FER faces, end to end"
    )
    demo.add_argument(
        "--data",
        type=Path,
        default=None,
        help="labelled face folder (default: the committed data/faces)",
    )
    demo.add_argument("--events", type=int, default=300)
    demo.add_argument("--keep-open", action="store_true", help="keep the live page up until Ctrl-C")
    demo.add_argument("--model-path", type=Path, default=None)
    demo.add_argument(
        "--bootstrap-servers",
        default=None,
        help="use this cluster instead of starting a local broker",
    )

    # eval and train own their arguments (their modules' main); `--help` works there.
    for name, text in (
        ("eval", "evaluate a LLaVA checkpoint on a labelled image folder"),
        ("train", "train or fine-tune a LLaVA checkpoint on a labelled image folder"),
    ):
        command = sub.add_parser(name, help=text, add_help=False)
        command.add_argument("rest", nargs=argparse.REMAINDER)
    tiny = sub.add_parser("make-tiny-model", help="write a small random LLaVA checkpoint")
    tiny.add_argument("path", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from consumer.ops.health import HealthServer
    from consumer.ops.logs import configure_logging, get_logger
    from consumer.ops.metrics import HealthState, WorkerMetrics

    stop = StopSignals()  # before the slow model load: a stop then must not be lost
    settings = load_settings(args.config, overrides_from_flags(args))
    if settings.processes.devices != "single":  # one worker process per device
        from consumer.ops.supervisor import run_supervisor

        return run_supervisor(settings, args.config, overrides_from_flags(args))
    configure_logging(settings.log)
    log = get_logger("consumer.cli")
    log.info("effective config", config=masked_settings(settings))
    # Up before the (minutes-long) model load: /livez answers, /readyz says not yet.
    metrics = WorkerMetrics()
    health = HealthState(settings.health.loop_stall_s, settings.health.stall_timeout_s)
    server = (
        HealthServer(settings.health.host, settings.health.port, metrics, health).start()
        if settings.health.enabled
        else None
    )
    try:
        return _serve(settings, stop, metrics, health)
    finally:
        if server is not None:
            server.close()


def _serve(
    settings: WorkerSettings, stop: StopSignals, metrics: WorkerMetrics, health: HealthState
) -> int:
    """Load and warm the model, then run the worker until it stops; the exit code."""
    from consumer.engine import EmotionEngine
    from consumer.ops.logs import get_logger
    from consumer.stream.worker import Worker

    log = get_logger("consumer.cli")
    started = time.perf_counter()
    engine = EmotionEngine.load(settings.model, max_batch_size=settings.batch.max_batch_size)
    loaded = time.perf_counter()
    engine.warm_up()  # compiles every batch bucket; the worker consumes only after this
    log.info(
        "model ready",
        model_id=engine.model_id,
        device=str(engine.device),
        dtype=str(engine.dtype).removeprefix("torch."),
        compiled=engine.compiled,
        buckets=list(engine.buckets),
        precision=engine.precision,
        quantized_layers=engine.quantized_layers,
        load_s=round(loaded - started, 2),
        warm_up_s=round(time.perf_counter() - loaded, 2),
    )
    if stop.requested:
        log.info("stopped before consuming anything")
        return 0
    health.model_ready = True
    worker = Worker(settings, engine, metrics=metrics, health=health)
    stop.on_stop(worker.request_stop)
    code = worker.run()
    if not worker.closed_cleanly:
        # A Kafka client that did not close would also block the interpreter's exit.
        sys.stderr.flush()
        os._exit(code)
    return code


class StopSignals:
    """First SIGTERM/SIGINT asks for a graceful stop; a second exits at once, committing nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._callback: Callable[[], None] | None = None
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def on_stop(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        if self.requested:
            callback()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.requested = True
        if self._callback is None:
            # Still loading the model: nothing is in flight, so leave right away.
            raise SystemExit(0)
        self._callback()


def cmd_check(args: argparse.Namespace) -> int:
    from consumer.preflight import run_preflight

    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    return run_preflight(
        args.config,
        overrides_from_flags(args),
        timeout_s=args.timeout,
        model=not args.skip_model,
        echo=lambda line: print(line, flush=True),
    )


def cmd_produce(args: argparse.Namespace) -> int:
    from consumer.event_source import PublishError, publish_folder

    settings = load_settings(args.config, overrides_from_flags(args))
    try:
        report = publish_folder(
            args.folder,
            settings,
            topic=args.topic,
            stream_id=args.stream_id,
            limit=args.limit,
            inline=args.inline,
            create_partitions=args.create_topic,
        )
    except (PublishError, FileNotFoundError) as exc:
        print(f"emotion-worker produce: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    if report.failed:
        errors = "; ".join(dict.fromkeys(report.errors[:5]))
        print(f"emotion-worker produce: delivery failed: {errors}", file=sys.stderr)
        return 1
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from consumer.replay.command import run_replay

    return run_replay(args, load_settings(args.config, overrides_from_flags(args)))


def cmd_dashboard(args: argparse.Namespace) -> int:
    from consumer.dashboard.command import run_dashboard

    return run_dashboard(args)


def cmd_summarize(args: argparse.Namespace) -> int:
    from consumer.summarize.command import run_summarize

    stop = StopSignals()
    settings = load_settings(args.config, summarize_overrides(args))
    return run_summarize(settings, masked_settings(settings), stop.on_stop)


def cmd_demo(args: argparse.Namespace) -> int:
    from consumer.demo import run_demo

    return run_demo(
        data=args.data,
        events=args.events,
        model_path=args.model_path,
        bootstrap_servers=args.bootstrap_servers,
        keep_open=args.keep_open,
    )


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from consumer.engine import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.path, seed=args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Progress bars are noise in JSON logs (and the demo prints its own lines).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["eval"], ["train"]):
        # Long offline jobs with arguments of their own (argparse's REMAINDER cannot take
        # a list that starts with a flag); their progress bars are wanted.
        os.environ.pop("TQDM_DISABLE", None)
        rest = argv[1:]
        if rest[:1] == ["--"]:  # `emotion-worker train -- --data ...`: a separator, not data
            rest = rest[1:]
        if argv[0] == "eval":
            from consumer.eval.cli import main as eval_main

            return eval_main(rest)
        from consumer.training.cli import main as train_main

        return train_main(rest)
    args = build_parser().parse_args(argv)
    commands = {
        "run": cmd_run,
        "check": cmd_check,
        "produce": cmd_produce,
        "replay": cmd_replay,
        "summarize": cmd_summarize,
        "dashboard": cmd_dashboard,
        "demo": cmd_demo,
        "make-tiny-model": cmd_make_tiny_model,
    }
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"emotion-worker: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
