"""``python -m ctcurate`` runs the command line."""

from ctcurate.cli import main

if __name__ == "__main__":
    main()
