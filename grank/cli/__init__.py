"""The ``grank`` command line: one subcommand per pipeline step, each runnable without Airflow.

Each capability owns one module here (``data``, ``features``, ...) that turns
:class:`grank.config.Settings` into plain arguments for the layer it drives. Heavy
libraries are imported inside commands, so ``grank --help`` stays fast.
"""

from __future__ import annotations

import gc
import sys

import click

from common.errors import UserFacingError
from grank.cli.data import data
from grank.cli.features import features
from grank.cli.serving import embeddings, recommend, serve, snapshot
from grank.cli.train import evaluate, model, offline_eval, train
from grank.config import load_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """GRank feature store and daily batch pipeline."""
    ctx.obj = load_settings()


cli.add_command(data)
cli.add_command(features)
cli.add_command(embeddings)
cli.add_command(snapshot)
cli.add_command(serve)
cli.add_command(recommend)
cli.add_command(train)
cli.add_command(evaluate)
cli.add_command(model)
cli.add_command(offline_eval)


def main() -> None:
    """Console entry point: user-facing errors become one ``error:`` line and exit code 1.

    The exit happens after the error is handled and the garbage collected, not inside the
    handler: an exit raised there would keep the failed command's frames (pyarrow tables,
    readers) alive as its context until interpreter teardown, where Arrow's native thread
    pools have been seen to abort the process (SIGABRT, "terminate called without an
    active exception") instead of exiting with the code the error asked for.
    """
    code = _run()
    gc.collect()
    sys.exit(code)


def _run() -> int:
    """Run the command line; the exit code of a handled error, 0 otherwise."""
    try:
        cli.main(standalone_mode=False)
    except UserFacingError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except OSError as exc:  # a file system problem the operator can fix: no traceback
        click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0
