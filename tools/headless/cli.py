"""The command line: python -m tools.headless WORKFLOW [options] (see --help)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
from pathlib import Path

from .client import ComfyClient, run_workflow
from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_REJECTED, ConversionError, HeadlessError, PromptRejected
from .server import LocalComfyUI, default_comfyui_path
from .workflow import apply_overrides, format_prompt_error, load_workflow, png_ui_workflow, ui_to_api

log = logging.getLogger("comfy_headless")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.headless",
        description="Run a ComfyUI workflow (UI or API format, or a ComfyUI PNG) without the browser: "
                    "convert it, queue it, show progress, and download the output images.",
        epilog="Model files: the shipped workflows name one checkpoint per family; point them at yours with "
               "--ckpt NAME (a file in ComfyUI's models/checkpoints, as the server lists it), or set any loader "
               "input with --set (e.g. --set UNETLoader.unet_name=flux1-dev.safetensors).\n\n"
               "Node ids for --set: NODE is a node id, a class_type when only one node has it, or a node title. "
               "Ids are the keys of the API-format file (workflows/api/*.json: \"3\": {\"class_type\": "
               "\"KSampler\", ...}); for a UI file, list them with --convert-only (prints the API graph; "
               "needs --server or --object-info) or turn on the frontend's node id badges "
               "(Settings > Lite Graph > Node ID badge).\n\n"
               "Exit codes: 0 ok, 1 execution failed, 2 usage/input/override error, 3 prompt rejected "
               "by the server (invalid graph; node_errors printed), 4 connection/server start error, "
               "5 timeout, 130 Ctrl-C.\n\nExamples (from the pack folder):\n"
               "  python -m tools.headless workflows/api/ag_ab_sd15.json --server http://127.0.0.1:8188 "
               "--ckpt my_sd15.safetensors\n"
               "  python -m tools.headless my_ui_workflow.json --comfyui ~/ComfyUI --cpu --seed 7 "
               "--set KSampler.steps=8 --set 6.text='a red fox'\n"
               "  python -m tools.headless wf.json --server 127.0.0.1:8188 --api-out wf_api.json --convert-only",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", help="workflow file: UI format (frontend save), API format, or a ComfyUI PNG")
    g = p.add_argument_group("server")
    g.add_argument("--server", metavar="URL",
                   help="URL of a running ComfyUI (e.g. http://127.0.0.1:8188). Without it, ComfyUI is "
                        "started from --comfyui and stopped at the end")
    g.add_argument("--comfyui", metavar="PATH",
                   help="ComfyUI checkout to start (default: $COMFYUI_PATH, else the ComfyUI root this pack "
                        "is installed in, else the host cache of tools/host.py, ~/comfy/ComfyUI-0.3.75)")
    g.add_argument("--cpu", action="store_true", help="start ComfyUI with --cpu")
    g.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the started ComfyUI's main.py, repeatable; write it with '=' "
                        "(e.g. --server-arg=--base-directory=/tmp/base)")
    g.add_argument("--port", type=int, help="port for the started ComfyUI (default: a free one)")
    g.add_argument("--python", metavar="EXE", help="Python to start ComfyUI with (default: this one)")
    g.add_argument("--startup-timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait for a started ComfyUI to answer (default 300)")
    g.add_argument("--server-log", metavar="FILE",
                   help="write the started ComfyUI's output here (default: a temp file, deleted on success)")
    o = p.add_argument_group("overrides (applied to the API graph after conversion)")
    o.add_argument("--seed", type=int, help="set every seed / noise_seed input")
    o.add_argument("--ckpt", metavar="NAME",
                   help="set every ckpt_name input (the checkpoint file the workflow loads, as ComfyUI lists it "
                        "in models/checkpoints)")
    o.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", dest="sets",
                   help="set one input; NODE is a node id (the keys of the API file; see below), a class_type "
                        "(when unique) or a node title; "
                        "VALUE is parsed as JSON when possible, else taken as a string "
                        "(quote it as JSON to force a string, e.g. '6.text=\"1\"'); repeatable")
    r = p.add_argument_group("run and output")
    r.add_argument("--out", default="headless_outputs", metavar="DIR",
                   help="directory for the downloaded outputs (default ./headless_outputs)")
    r.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for the prompt to finish (default 600)")
    r.add_argument("--api-out", metavar="FILE",
                   help="write the API-format graph that is sent (after conversion and overrides)")
    r.add_argument("--object-info", metavar="FILE",
                   help="use this saved GET /object_info JSON for the conversion instead of the server's")
    r.add_argument("--convert-only", action="store_true",
                   help="convert and apply overrides, write --api-out (or stdout), and do not run")
    r.add_argument("--dynamic-prompt-seed", type=int, default=None, metavar="N",
                   help="seed for resolving {a|b} choices in dynamic-prompt text widgets of UI workflows "
                        "(default: 0, so runs are reproducible)")
    v = p.add_argument_group("logging")
    v.add_argument("-v", "--verbose", action="store_true", help="debug output")
    v.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    return p


@contextlib.contextmanager
def _cli_logging(verbose: bool, quiet: bool):
    """Plain messages on stderr for the CLI; the logger's previous state is restored afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _execute(args: argparse.Namespace) -> int:
    fmt, workflow = load_workflow(args.workflow)
    ui_workflow = workflow if fmt == "ui" else png_ui_workflow(args.workflow)
    log.info("workflow %s: %s format, %d nodes", args.workflow, fmt.upper(),
             len(workflow["nodes"]) if fmt == "ui" else len(workflow))
    object_info = None
    if args.object_info:
        try:
            object_info = json.loads(Path(args.object_info).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConversionError(f"cannot read --object-info {args.object_info}: {e}") from e

    def prepare(client: ComfyClient | None) -> dict:
        nonlocal object_info
        if object_info is None and client is not None and (fmt == "ui" or args.sets):
            object_info = client.object_info()
        if fmt == "ui":
            rng = random.Random(args.dynamic_prompt_seed if args.dynamic_prompt_seed is not None else 0)
            api = ui_to_api(workflow, object_info, rng=rng)
            log.info("converted to API format: %d nodes", len(api))
        else:
            api = json.loads(json.dumps(workflow))
        for change in apply_overrides(api, seed=args.seed, ckpt=args.ckpt, sets=args.sets,
                                      object_info=object_info):
            log.info("override: %s", change)
        if args.api_out:
            Path(args.api_out).write_text(json.dumps(api, indent=2), encoding="utf-8")
            log.info("wrote API graph to %s", args.api_out)
        return api

    def run_on(client: ComfyClient | None) -> int:
        api = prepare(client)
        if args.convert_only:
            if not args.api_out:
                sys.stdout.write(json.dumps(api, indent=2) + "\n")
            return EXIT_OK
        try:
            saved = run_workflow(client, api, ui_workflow=ui_workflow, out_dir=args.out, timeout=args.timeout)
        except PromptRejected as e:
            log.error("the server rejected the prompt:\n%s", format_prompt_error(e.response, api))
            return EXIT_REJECTED
        for path in saved:
            sys.stdout.write(f"{path}\n")
        sys.stdout.flush()
        log.info("done: %d file(s) in %s", len(saved), args.out)
        return EXIT_OK

    if args.convert_only and (object_info is not None or (fmt == "api" and not args.sets)):
        return run_on(None)
    if args.server:
        return run_on(ComfyClient(args.server))
    root = Path(args.comfyui).expanduser() if args.comfyui else default_comfyui_path()
    with LocalComfyUI(root, cpu=args.cpu, extra_args=args.server_arg, port=args.port, python=args.python,
                      startup_timeout=args.startup_timeout, log_path=args.server_log) as server:
        code = run_on(ComfyClient(server.url))
        if code != EXIT_OK:
            server.keep_log = True
            log.info("ComfyUI log kept at %s", server.log_path)
        return code


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so a self-started ComfyUI is stopped and the prompt cancelled."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _cli_logging(args.verbose, args.quiet), _sigterm_as_interrupt():
        try:
            return _execute(args)
        except HeadlessError as e:
            log.error("%s", e)
            return e.exit_code
        except KeyboardInterrupt:
            log.error("interrupted")
            return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
