"""bench.llava_bench's command line, the defaults that depend on the device, and the model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from bench._bench_worker import IMAGE_MODES
from bench._frames import FER_FACES
from bench._llava_shapes import SHAPES, build_random_checkpoint, write_shape_folder
from bench._variants import VARIANTS, variant_settings
from consumer.engine import make_tiny_checkpoint
from consumer.engine.loader import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
# --variants choices: the HF baseline and the engine variants (the worker rows have
# --worker-broker and --no-worker).
CHOICES = ("naive-generate", *VARIANTS)
# (CUDA, CPU) defaults of the options whose sensible value depends on the device.
DEVICE_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "model": ("llava-7b", "tiny"),
    "batch_sizes": ("1,8,32", "1,16"),
    "iterations": (20, 10),
    "worker_events": (512, 200),
    "row_time_s": (10.0, 5.0),
}


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """Options; the device-dependent ones stay None until `apply_defaults`."""
    parser = argparse.ArgumentParser(prog="python -m bench.llava_bench", description=description)
    add = parser.add_argument
    add(
        "--model",
        choices=["tiny", *SHAPES],
        help="default: llava-7b on CUDA, tiny on CPU "
        "(llava-7b-mini: the 7B image geometry with tiny widths, to test the path on a CPU)",
    )
    add(
        "--model-path",
        type=Path,
        help="--model tiny: checkpoint folder to load; a tiny one is "
        "written there if it has no config.json (default .cache/models/tiny-llava)",
    )
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--batch-sizes", help='comma list; default "1,8,32" on CUDA, "1,16" on CPU')
    add(
        "--other-batches",
        help='batches of the variants other than eager: a comma list that may name "best" '
        '(the fastest eager batch), e.g. "1,best"; default: --batch-sizes',
    )
    add("--variants", help=f"comma list of {','.join(CHOICES)}; default all that apply")
    add("--iterations", type=int, help="timed batches per row (median); default 20 CUDA, 10 CPU")
    add("--row-time-s", type=float, help="stop a row's timing loop after this many seconds")
    add("--time-budget-s", type=float, default=270.0, help="whole run, from process start")
    add("--data", type=Path, default=FER_FACES, help="face folder, one subfolder per class")
    add("--agree-faces", type=int, default=32, help="faces for the label agreement columns")
    add("--flops-per-image", type=float, help="override the computed FLOP estimate")
    add("--peak-tflops", type=float, default=790.0, help="bf16 dense ceiling (H200: 790)")
    add("--worker-events", type=int, help="events for the worker rows; default 512 CUDA, 200 CPU")
    add(
        "--worker-broker",
        choices=["auto", "memory", "kafka", "both"],
        default="auto",
        help="worker rows: the in-memory broker (no JVM, no network), a Kafka broker, or "
        "both; auto (default): memory, plus Kafka when --bootstrap-servers is given or a "
        "local broker's jars are cached and Java is here",
    )
    add(
        "--worker-images",
        choices=IMAGE_MODES,
        default="http",
        help="how events reference their image: http (a loopback image server, the "
        "default: the worker's real fetch path), file (file:// paths) or data (inline)",
    )
    add("--bootstrap-servers", help="worker-kafka: use this broker instead of a local one")
    add("--no-worker", action="store_true", help="skip the end-to-end worker rows")
    add("--out", type=Path, default=REPO / ".cache" / "bench", help="folder for .md and .json")
    return parser.parse_args(argv)


def apply_defaults(args: argparse.Namespace, device: torch.device) -> None:
    for name, (cuda, cpu) in DEVICE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, cuda if device.type == "cuda" else cpu)
    args.batch_list = sorted({int(size) for size in args.batch_sizes.split(",") if size.strip()})
    other = args.other_batches or args.batch_sizes
    args.other_list = [size.strip() for size in other.split(",") if size.strip()]
    if any(size != "best" and not size.isdigit() for size in args.other_list):
        raise SystemExit(f"--other-batches takes numbers and 'best', not {other!r}")
    unknown = set(args.variants.split(",")) - set(CHOICES) if args.variants else set()
    if unknown:
        raise SystemExit(f"unknown --variants {sorted(unknown)}; choose from {CHOICES}")


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def asked_variants(args: argparse.Namespace) -> list[str] | None:
    """--variants as a list, None when not given."""
    return args.variants.split(",") if args.variants else None


def load_model(
    model: str, model_path: Path | None, device: torch.device, scratch: Path
) -> tuple[Any, str]:
    """The LoadedCheckpoint of --model, and a line saying what it is."""
    if model == "tiny":
        path = model_path or REPO / ".cache" / "models" / "tiny-llava"
        if not (path / "config.json").exists():
            make_tiny_checkpoint(path)
        settings = variant_settings({"path": path, "device": device.type}, "eager")[0]
        # What EmotionEngine.load does, split so the checkpoint can serve every variant.
        return load_checkpoint(settings), f"checkpoint {path}"
    folder = write_shape_folder(scratch / f"{model}-shape", SHAPES[model])
    checkpoint = build_random_checkpoint(folder, device, torch.bfloat16)
    return checkpoint, f"{model}-shaped model, RANDOM weights built on {device}"
