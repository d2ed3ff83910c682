"""Write docs/cli.md from the `visguard` commands' own --help (`make docs`; `--check` compares only).

Every command is rendered, including those that installed plugins add through `register_commands`
(with the repository's plugins installed, as `make install` does). tests/test_cli_docs.py fails when
docs/cli.md and --help disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = 100

HEADER = """# Command-line reference

Generated from the commands' own `--help` by `make docs` (`python scripts/cli_reference.py`);
`tests/test_cli_docs.py` fails when this page and `--help` disagree. Plugins add commands through the
`register_commands(cli)` hook (docs/plugins.md); this page shows the commands of the plugins in this
repository, as `make install` installs them. Errors are one line on stderr with exit code 2.
"""


def _origin(cmd: click.Command) -> str:
    module = getattr(cmd.callback, "__module__", "") or ""
    if module.startswith("visguard.default_plugins."):
        return f"built-in plugin `{module}`"
    if module.startswith("visguard.") or module == "visguard":
        return "core"
    return f"plugin `{module.split('.')[0]}`"


def _help(path: list[str]) -> str:
    """What `visguard PATH... --help` prints, at a fixed width."""
    from click.testing import CliRunner

    from visguard.cli import cli

    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="visguard", terminal_width=WIDTH,
                                max_content_width=WIDTH)
    if result.exit_code != 0:
        raise RuntimeError(f"visguard {' '.join(path)} --help failed: {result.output}")
    return result.output.rstrip()


def _walk(cmd: click.Command, path: list[str], out: list[str]) -> None:
    out += [f"## `{' '.join(['visguard', *path])}`", "",
            f"From the {_origin(cmd)}." if path else "The root command.", "",
            "```text", _help(path), "```", ""]
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            sub = cmd.commands[name]
            if not sub.hidden:
                _walk(sub, [*path, name], out)


def render() -> str:
    """The whole reference page."""
    from visguard import cli as cli_module

    cli_module._register_plugin_commands()  # what the `visguard` entry point does before parsing
    root = cli_module.cli
    commands = [n for n in sorted(root.commands) if not root.commands[n].hidden]
    out = [HEADER, "Commands: " + ", ".join(f"[`{n}`](#visguard-{n})" for n in commands) + ".", ""]
    _walk(root, [], out)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} differs from --help: run `make docs`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
