"""Paper-compatible front-end: coarse search on a correlation matrix, then fine search. See ``--help``."""

from comflp.cli.search import search_main

if __name__ == "__main__":
    search_main()
