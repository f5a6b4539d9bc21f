"""Paper-compatible front-end: SVCCA matrix (``python svcca_analysis.py --batch_size 32 --iter_num 300 --thre 0.99 --mode U``)."""

from comflp.cli.measure import svcca_main

if __name__ == "__main__":
    svcca_main()
