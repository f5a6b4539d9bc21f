"""Paper-compatible front-end: distance-correlation matrix (``python dc_analysis.py --batch_size 4 --iter_num 10``)."""

from comflp.cli.measure import dc_main

if __name__ == "__main__":
    dc_main()
