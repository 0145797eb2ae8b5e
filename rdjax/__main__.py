"""`python -m rdjax <subcommand> ...`: the same as the `rdjax` command (rdjax.cli)."""

from rdjax.cli import main

if __name__ == "__main__":
    main()
