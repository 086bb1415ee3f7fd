"""Remove what interrupted runs left behind: temporary outputs of runs that are no longer alive.

A run builds its output in ``DIR/.NAME.tmp-PID-XXXX`` and holds the lock ``DIR/.NAME.lock``
while it does; a run killed with SIGKILL, an out-of-memory kill or a power cut leaves them
behind. The next run to the same output removes them itself; ``tangquant clean DIR`` removes
every leftover in DIR whose lock no live run holds (never what a live run is building).

Example:
  tangquant clean work/ --dry-run
"""

from __future__ import annotations

from dataclasses import dataclass

from tangquant import claim, files, recipe
from tangquant.recipe import param

HELP = "remove temporary outputs that interrupted runs left behind"


@dataclass(frozen=True)
class CleanParams:
    dry_run: bool = param(False, "only list what would be removed")


PARAMS = CleanParams


def add_arguments(parser) -> None:
    parser.add_argument("dirs", nargs="*", default=["."], metavar="DIR",
                        help="directories that hold outputs (default: the current one)")


def run(args) -> dict:
    return clean(args.dirs, recipe.from_args(CleanParams, args))


def clean(dirs=(".",), params: CleanParams | None = None, **overrides) -> dict:
    """Remove (or, with ``dry_run``, list) the leftovers in each of ``dirs``."""
    p = recipe.resolve(CleanParams, params, overrides)
    removed = []
    for d in dirs:
        removed += claim.remove_leftovers(files.existing_dir(d, "directory"), dry_run=p.dry_run)
    verb = "would remove" if p.dry_run else "removed"
    names = ", ".join(str(x) for x in removed[:10]) + (", …" if len(removed) > 10 else "")
    return {"removed": [str(x) for x in removed],
            "summary": f"{verb} {len(removed)} leftover(s) of interrupted runs" + (f": {names}" if removed else "")}
