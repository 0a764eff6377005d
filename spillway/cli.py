"""The one `spillway` command. Each component adds its subcommands in its own `cli` module.

Global flags (`--log-level`) are accepted before or after the subcommand, as kubectl's are;
`spillway completion bash` prints a shell completion script made from the parser itself.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Iterator, Sequence

from spillway import __version__
from spillway import logging as slog

# Modules with `add_commands(subparsers)`; each registers subcommands whose handler is
# stored as `func` (sync, returning an exit code).
COMMAND_MODULES = (
    "spillway.agent.cli",
    "spillway.operator.cli",
    "spillway.deviceplugin.cli",
    "spillway.dra.cli",
)
LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_global_flags(p: argparse.ArgumentParser, *, top: bool) -> None:
    # Below the top level the default is SUPPRESS, so a flag given before the subcommand is not
    # reset by the subcommand's parser.
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, metavar="LEVEL",
                   default=None if top else argparse.SUPPRESS,
                   help="debug, info, warning or error (default: info, or $SPILLWAY_LOG_LEVEL); before or after "
                        "the subcommand")


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the command tree with its path of subcommand names, the root first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    return [n for a in parser._actions if isinstance(a, argparse._SubParsersAction) for n in a.choices]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spillway", description="Lend idle GPU memory to the tenants that need it.")
    parser.add_argument("--version", action="version", version=f"spillway {__version__}")
    _add_global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    comp = sub.add_parser("completion", help="print a shell completion script: "
                                             "source <(spillway completion bash)")
    comp.add_argument("shell", choices=("bash",), help="the shell: bash")
    comp.set_defaults(func=lambda args: _print_completion(parser, args.shell))
    for path, p in walk(parser):
        if path and not _subcommands(p):
            _add_global_flags(p, top=False)
    return parser


def completion_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for the parser's whole command tree."""
    subs, flags, valued, choices, files = {}, {}, {}, {}, {}
    for path, p in walk(parser):
        key = " ".join(("@", *path))  # bash has no empty keys: the root is "@"
        subs[key] = " ".join(_subcommands(p))
        opts = [o for a in p._actions for o in a.option_strings if o.startswith("--") or len(o) == 2]
        flags[key] = " ".join(opts)
        valued[key] = " ".join(o for a in p._actions if a.option_strings and a.nargs != 0 for o in a.option_strings)
        for a in p._actions:
            if not a.option_strings and a.choices and not isinstance(a, argparse._SubParsersAction):
                choices[f"{key}|"] = " ".join(str(c) for c in a.choices)  # a positional's values
            for o in a.option_strings:
                if a.choices:
                    choices[f"{key}|{o}"] = " ".join(str(c) for c in a.choices)
                elif a.nargs != 0 and a.type is not None and getattr(a.type, "__name__", "") in ("Path", "PosixPath"):
                    files[f"{key}|{o}"] = "1"

    def assoc(name: str, table: dict[str, str]) -> str:
        body = " ".join(f"[{shlex.quote(k)}]={shlex.quote(v)}" for k, v in table.items())
        return f"declare -gA {name}=({body})"

    return "\n".join([
        "# spillway shell completion: source <(spillway completion bash)",
        assoc("_spillway_subs", subs), assoc("_spillway_flags", flags), assoc("_spillway_valued", valued),
        assoc("_spillway_choices", choices), assoc("_spillway_files", files),
        r'''_spillway() {
  local cur prev path w i skip=0
  cur="${COMP_WORDS[COMP_CWORD]}"
  prev=""; [ "$COMP_CWORD" -gt 0 ] && prev="${COMP_WORDS[COMP_CWORD-1]}"
  path="@"
  for ((i=1; i<COMP_CWORD; i++)); do
    w="${COMP_WORDS[i]}"
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    case "$w" in
      -*=*) ;;
      -*) case " ${_spillway_valued[$path]} " in *" $w "*) skip=1 ;; esac ;;
      *) case " ${_spillway_subs[$path]} " in *" $w "*) path="$path $w" ;; esac ;;
    esac
  done
  if [ "$skip" = 1 ]; then
    local ch="${_spillway_choices[$path|$prev]}"
    if [ -n "$ch" ]; then COMPREPLY=($(compgen -W "$ch" -- "$cur"))
    elif [ -n "${_spillway_files[$path|$prev]}" ]; then COMPREPLY=($(compgen -f -- "$cur"))
    else COMPREPLY=(); fi
    return 0
  fi
  if [[ "$cur" == -* ]]; then
    COMPREPLY=($(compgen -W "${_spillway_flags[$path]}" -- "$cur"))
  else
    local ch="${_spillway_subs[$path]}"
    [ -z "$ch" ] && ch="${_spillway_choices[$path|]}"
    COMPREPLY=($(compgen -W "$ch" -- "$cur"))
  fi
}
complete -o default -F _spillway spillway''',
    ]) + "\n"


def _print_completion(parser: argparse.ArgumentParser, shell: str) -> int:
    assert shell == "bash", shell
    sys.stdout.write(completion_script(parser))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    slog.setup(args.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `spillway pool show | head`
        return 0
    except SystemExit:
        raise
    except Exception as exc:  # a clear one-line error for the person at the terminal
        print(f"spillway: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
