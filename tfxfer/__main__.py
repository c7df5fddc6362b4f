"""`python -m tfxfer` is the `tfxfer` command."""

from tfxfer.cli import main

if __name__ == "__main__":
    main(prog_name="tfxfer")
