"""Where runs live and what they hold: the data root and allowed paths (``paths``), the run directory
written atomically with its manifest last (``rundir``), and the Parquet schemas every run writes (``schema``).
"""
