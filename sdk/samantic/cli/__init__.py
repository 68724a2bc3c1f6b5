"""The ``samantic`` command line (Typer). One module per command group."""
