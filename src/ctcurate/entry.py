"""The ``ctcurate`` console script: the command line, or one line naming the missing extra.

Reading a release needs only ``h5py``, ``hdf5plugin`` and ``numpy``; the command line needs
the ``build`` extra (``pip install 'ctcurate[build,train]'``). Without it, the script says
so instead of ending in an ``ImportError`` traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run the command line (:func:`ctcurate.cli.main`)."""
    try:
        from ctcurate.cli import main as cli_main
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "ctcurate":
            raise
        sys.stderr.write(
            f"ctcurate: error: the command line needs the 'build' extra (module {exc.name} "
            "is missing): pip install 'ctcurate[build,train]'\n"
        )
        sys.exit(2)
    cli_main()
