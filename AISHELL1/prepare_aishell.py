"""Build AISHELL1/aishell_{train,dev,test}/ from the official AISHELL-1 tree.

    python AISHELL1/prepare_aishell.py /path/to/data_aishell
"""

from comflp.cli.aishell import main

if __name__ == "__main__":
    main()
