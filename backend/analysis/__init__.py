"""Analyses of indexed runs: the registry of analyses, each with its figure and job kind (``analyses``), one
module per job kind with that kind's analyses and summary (``trace`` for train runs), metrics with textbook
definitions (``metrics``), pure figure builders (``figures``) and the ``analyze`` / ``compare`` reports
(``report``).
"""
