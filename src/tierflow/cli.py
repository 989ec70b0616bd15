"""The ``tierflow`` command line.

Every command loads its inputs, runs and writes explicitly. Bad input raises :class:`TierflowError` (or a
click usage error); :func:`main` turns either into one line on stderr and exit status 2.
"""

from __future__ import annotations

import errno
import json
import os
import sys

import click

from tierflow.errors import TierflowError


def echo_json(payload) -> None:
    """Machine-readable output: one JSON document on stdout and nothing else there."""
    click.echo(json.dumps(payload, indent=2, allow_nan=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tierflow")
def cli() -> None:
    """tierflow: simulate MoE expert offloading over GPU HBM, host DDR and NVMe SSD."""


@cli.group()
def trace() -> None:
    """Generate, import and inspect expert-activation traces (tierflow-trace v1, HDF5)."""


# Subcommands live beside the code they drive; each module registers its own.
from tierflow import compare as _compare  # noqa: E402
from tierflow import paper_commands as _paper_commands  # noqa: E402
from tierflow import sweep_commands as _sweep_commands  # noqa: E402
from tierflow.cache import commands as _cache_commands  # noqa: E402
from tierflow.catalog import commands as _catalog_commands  # noqa: E402
from tierflow.sim import commands as _sim_commands  # noqa: E402
from tierflow.trace import commands as _trace_commands  # noqa: E402

_trace_commands.register(trace)
_catalog_commands.register(cli)
_sim_commands.register(cli)
_compare.register(cli)
_cache_commands.register(cli)
_sweep_commands.register(cli)
_paper_commands.register(cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and ``python -m tierflow``."""
    try:
        status = cli.main(args=argv, prog_name="tierflow", standalone_mode=False)
    except TierflowError as error:
        _fail(str(error))
    except click.exceptions.Abort:
        _fail("aborted", status=130)
    except click.exceptions.NoArgsIsHelpError as error:
        # A group named without a subcommand (`tierflow`, `tierflow trace`): its help, as `--help` prints it.
        click.echo(error.ctx.get_help())
        sys.exit(0)
    except click.ClickException as error:
        _fail(error.format_message())
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        if error.errno in _PATH_ERRORS and error.filename:
            _fail(f"{where}{os.strerror(error.errno)}")
        if error.errno not in _STORAGE_ERRORS:
            raise
        _fail(f"cannot write an output: {where}{os.strerror(error.errno)} (the output was not written)")
    sys.exit(status if isinstance(status, int) else 0)


# A write that fails for want of room or permission on the storage, not because of tierflow: one line.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
# A path given on the command line that the system cannot even look up: bad input, not a failure of tierflow.
_PATH_ERRORS = {errno.ENAMETOOLONG, errno.ELOOP}


def _fail(message: str, status: int = 2) -> None:
    first_line = " ".join(message.split())
    click.echo(f"tierflow: error: {first_line}", err=True)
    sys.exit(status)
