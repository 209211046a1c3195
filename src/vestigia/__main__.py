"""`python -m vestigia ...`: the same as the `vestigia` command."""

from vestigia.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
