"""The `raftpay` command line (click).  Grows with the cluster issue."""

import click


@click.group()
def main() -> None:
    """raftpay: a Raft-replicated payment ledger."""


@main.command()
def demo() -> None:
    """Start a local 3-node cluster and show a payment flowing."""
    click.echo("cluster coming: the node, server and client land with the cluster issue")
