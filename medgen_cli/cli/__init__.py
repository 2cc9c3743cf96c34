"""The command line: the only place typer/rich are imported."""
