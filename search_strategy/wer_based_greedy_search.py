"""Paper-compatible front-end: greedy layer pruning by CER/WER (the GLP baseline). See ``--help``."""

from comflp.cli.search import glp_main

if __name__ == "__main__":
    glp_main()
