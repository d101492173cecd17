"""``dtx images build|list``: the charts' container images, built here without Docker.

Failures end the way ``dtx infra`` and ``dtx toolchain`` end them: one ``error: ...`` line
on stderr (a failed step's log tail before it) and exit code 1.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dtx_infra import images
from dtx_infra.cli import _guard

images_app = typer.Typer(
    name="images",
    help="Build the container images of the charts' pods on this machine (no Docker engine; "
    "OCI archives cached in ~/.cache/dtx/images).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_out = Console(highlight=False, soft_wrap=True)


@images_app.command("build")
def build(
    names: Annotated[
        list[str] | None,
        typer.Argument(help=f"Images to build (default: all): {', '.join(images.NAMES)}."),
    ] = None,
) -> None:
    """Build each image unless its inputs are unchanged (then it prints `cached`).

    What `make images` runs: tests and the cluster only find the archives afterwards.
    Progress goes to stderr: one line per image at its start and end, and a heartbeat once
    a minute while a long step runs. Needs root, buildah and mmdebstrap.
    """
    _guard(lambda: images.build(names or ()))


@images_app.command("list")
def list_images() -> None:
    """Show each image: its reference for the current inputs, and whether it is built."""
    table = Table("image", "reference", "state", "archive", title="dtx images")
    for st in _guard(images.status):
        state = f"[green]built[/green] {st.note}" if st.archive else f"[red]{st.note}[/red]"
        table.add_row(st.name, st.ref or "-", state, str(st.archive or "-"))
    _out.print(table)
