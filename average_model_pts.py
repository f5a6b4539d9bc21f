"""Paper-compatible front-end: average fine-tuning checkpoints. See ``--help``."""

from comflp.cli.average import main

if __name__ == "__main__":
    main()
