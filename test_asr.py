"""Paper-compatible front-end: decode a test set (CER/WER, RTF, parameters). See ``--help``."""

from comflp.cli.testset import main

if __name__ == "__main__":
    main()
